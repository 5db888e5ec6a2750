from neoxconv.cli import main

main()
