"""Find and describe a GPT-NeoX (DeepSpeed) checkpoint: its step folder, layout, TP degree, config and files.

Two layouts are understood:

* pipeline: ``layer_{idx:02d}-model_{rank:02d}-model_states.pt``, one file per source layer per rank
  (the GPT-NeoX-20B release);
* sequential: ``mp_rank_{rank:02d}_model_states.pt`` holding ``{"module": {"sequential.{idx}.{key}": t}}``
  (trained with pipe-parallel-size 0).

Nothing here reads tensor data: `open_checkpoint` parses only the pickled tensor descriptions, so every
file is checked for presence and readability before the merge writes a byte.
"""

from __future__ import annotations

import enum
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from neoxconv.config import NeoXConfig, TokenizerSettings, tokenizer_settings
from neoxconv.errors import CheckpointError, ConfigError, few
from neoxconv.source.ptfile import PtArchive, TensorRef, read_pt
from neoxconv.source.tokenizer import GIVEN, TokenizerSource, tokenizer_source

log = logging.getLogger(__name__)

_PIPE_FILE = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$", re.ASCII)
_SEQ_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$", re.ASCII)
# A sequential key exactly as gpt-neox writes it (fullmatch, ASCII digits, no leading zeros, a plain module path):
# one key, one (layer, name). A looser parse maps several keys torch.load keeps apart onto one tensor
# ("sequential.02.x", "sequential.\u0662.x", "sequential.2.x\n" all read as layer 2's "x").
_SEQ_KEY = re.compile(r"sequential\.(0|[1-9][0-9]{0,5})\.([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)", re.ASCII)


class LayerKind(enum.Enum):
    EMBEDDING = "embedding"
    BLOCK = "block"
    FINAL_NORM = "final_norm"
    READOUT = "readout"


@dataclass(frozen=True)
class SourceLayer:
    """One pipeline stage that has weights: its source index and what it is."""

    index: int
    kind: LayerKind
    block: int | None = None  # 0-based transformer block number for BLOCK layers

    @property
    def label(self) -> str:
        return f"layer {self.index:02d} ({self.kind.value}{'' if self.block is None else f' {self.block}'})"


def model_layers(config: NeoXConfig, *, with_readout: bool = True) -> list[SourceLayer]:
    """The source layers of a model, in order, derived from ``num_layers`` alone."""
    layers = [SourceLayer(config.embedding_index, LayerKind.EMBEDDING)]
    layers += [SourceLayer(idx, LayerKind.BLOCK, block=b) for b, idx in enumerate(config.block_indices)]
    layers.append(SourceLayer(config.final_norm_index, LayerKind.FINAL_NORM))
    if with_readout:
        layers.append(SourceLayer(config.readout_index, LayerKind.READOUT))
    return layers


def pipeline_file_name(index: int, rank: int) -> str:
    return f"layer_{index:02d}-model_{rank:02d}-model_states.pt"


def sequential_file_name(rank: int) -> str:
    return f"mp_rank_{rank:02d}_model_states.pt"


@dataclass
class Checkpoint:
    """A located checkpoint. ``tensors(layer, rank)`` gives that shard's ``{neox_key: TensorRef}``."""

    root: Path
    step_dir: Path
    layout: str  # "pipeline" | "sequential"
    tp_degree: int
    config: NeoXConfig
    config_source: str
    layers: list[SourceLayer]
    tokenizer: TokenizerSource | None
    missing_files: list[str] = field(default_factory=list)
    _archives: dict[Path, PtArchive] = field(default_factory=dict, repr=False)

    def layer_files(self, layer: SourceLayer) -> list[Path]:
        if self.layout == "pipeline":
            return [self.step_dir / pipeline_file_name(layer.index, r) for r in range(self.tp_degree)]
        return [self.step_dir / sequential_file_name(r) for r in range(self.tp_degree)]

    def source_files(self) -> list[Path]:
        return list(dict.fromkeys(f for layer in self.layers for f in self.layer_files(layer)))  # ordered, linear

    def archive(self, path: Path) -> PtArchive:
        if path not in self._archives:
            self._archives[path] = read_pt(path, lenient=self.layout == "sequential")
        return self._archives[path]

    def tensors(self, layer: SourceLayer, rank: int) -> dict[str, TensorRef]:
        path = self.layer_files(layer)[rank]
        archive = self.archive(path)
        if self.layout == "pipeline":
            return archive.tensors()
        out = {}
        for key, ref in archive.tensors(("module",)).items():
            m = _SEQ_KEY.fullmatch(key)
            if m is None:
                raise CheckpointError(
                    f"{path}: module key {key[:120]!r} is not 'sequential.<layer>.<name>' as gpt-neox writes it "
                    "(ASCII digits without leading zeros, a plain module path); torch.load keeps it as a key of its "
                    "own, so it cannot be read as any layer's tensor")
            if int(m.group(1)) == layer.index:
                out[m.group(2)] = ref  # canonical: no two keys give the same (layer, name)
        return out

    def release(self, layer: SourceLayer) -> None:
        """Forget a pipeline layer's parsed descriptions (sequential files stay: they serve every layer)."""
        if self.layout == "pipeline":
            for f in self.layer_files(layer):
                self._archives.pop(f, None)


def _sequential_layers(ckpt: Checkpoint) -> list[SourceLayer]:
    """The layers the ``mp_rank`` files' module keys hold (their pickles read, no tensor data): every key's layer
    must be one ``num_layers`` gives (keys of other layers mean another model, never ignored); a tied config's
    readout is included when keys for it are present (`plan_source` then drops it only if it equals the
    embedding, as for the pipeline layout's files)."""
    config = ckpt.config
    known = {layer.index for layer in model_layers(config, with_readout=True)}
    found: set[int] = set()
    for path in (ckpt.step_dir / sequential_file_name(r) for r in range(ckpt.tp_degree)):
        for key in ckpt.archive(path).tensors(("module",)):
            m = _SEQ_KEY.fullmatch(key)
            if m is not None:  # (any other key is refused, naming it, when the layers are read)
                found.add(int(m.group(1)))
        stray = sorted(found - known)
        if stray:
            raise CheckpointError(
                f"{path}: module keys of layers {few(stray)} do not fit num_layers={config.num_layers} from "
                f"{ckpt.config_source} (expected layers {few(sorted(known))}): another model's files, or the config's "
                "num-layers is wrong")
    return model_layers(config, with_readout=not config.tie_word_embeddings or config.readout_index in found)


def find_step_dir(src: Path) -> tuple[Path, Path]:
    """(root, step_dir) for SRC = a checkpoint root (with ``latest`` or one global_step*) or a step folder."""
    src = Path(src)
    if not src.exists():
        raise CheckpointError(f"{src}: no such file or directory")
    if not src.is_dir():
        raise CheckpointError(f"{src}: expected a checkpoint folder, got a file")
    if _has_weights(src):
        return src.parent, src
    latest = src / "latest"
    if latest.is_file():
        try:
            with open(latest, "rb") as f:
                raw = f.read(4097)
            name = raw.decode("utf-8").strip() if len(raw) <= 4096 else None
        except UnicodeDecodeError:
            name = None
        except OSError as e:
            raise CheckpointError(f"{latest}: cannot read: {e.strerror or e}") from None
        if name is None:  # DeepSpeed writes the step folder's name there, nothing else
            raise CheckpointError(f"{latest}: not a step folder name (binary or over 4096 bytes); "
                                  "pass the step folder itself as SRC")
        step = src / name
        if not step.is_dir():
            raise CheckpointError(f"{latest}: names {name!r}, which is not a folder in {src}; "
                                  "pass the step folder itself as SRC")
        return src, step
    steps = sorted(p for p in src.glob("global_step*") if p.is_dir())
    if len(steps) == 1:
        return src, steps[0]
    if not steps:
        if (src / "config.json").is_file() and any(src.glob("*.safetensors")):  # a mistake, not a broken checkpoint
            raise CheckpointError(
                f"{src}: a Hugging Face model folder (config.json, *.safetensors), not a gpt-neox checkpoint: "
                f"'neoxconv verify {src} --ids 1,2,3' checks it, 'neoxconv split {src} OUT --tp N' makes a gpt-neox "
                "checkpoint of it"
            )
        raise CheckpointError(
            f"{src}: no checkpoint here: no layer_*-model_*-model_states.pt or mp_rank_*_model_states.pt files, "
            "no 'latest' file and no global_step* folder"
        )
    raise CheckpointError(
        f"{src}: several step folders ({few([p.name for p in steps])}) and no 'latest' file; "
        "pass the step folder itself as SRC"
    )


def _has_weights(d: Path) -> bool:
    return any(_PIPE_FILE.match(p.name) or _SEQ_FILE.match(p.name) for p in d.iterdir())


def _yaml_files(root: Path, step_dir: Path, explicit: Path | None) -> list[Path]:
    """The NeoX YAML files the config is read from (none when it is a config.json)."""
    if explicit is not None:
        return [] if Path(explicit).suffix == ".json" else [Path(explicit)]
    for d in (step_dir / "configs", root / "configs", step_dir, root):
        ymls = sorted(p for p in d.glob("*.y*ml") if p.is_file()) if d.is_dir() else []
        if ymls:
            return ymls
    return []


def find_config(root: Path, step_dir: Path, explicit: Path | None) -> tuple[NeoXConfig, str]:
    """The model config: ``--config`` (NeoX YAML or config.json), else configs/*.yml near the checkpoint."""
    if explicit is not None:
        explicit = Path(explicit)
        if not explicit.is_file():
            raise ConfigError(f"{explicit}: no such config file")
        if explicit.suffix == ".json":
            return NeoXConfig.from_hf_json(explicit), str(explicit)
        return NeoXConfig.from_neox_yaml(explicit), str(explicit)
    ymls = _yaml_files(root, step_dir, None)
    if ymls:
        return NeoXConfig.from_neox_yaml(*ymls), ", ".join(str(p) for p in ymls)
    for d in (step_dir, root):
        if (d / "config.json").is_file():
            return NeoXConfig.from_hf_json(d / "config.json"), str(d / "config.json")
    raise ConfigError(
        f"{root}: no model config found (looked for configs/*.yml and config.json); "
        "pass the NeoX YAML the model was trained with, e.g. --config configs/20B.yml"
    )


def _named_file(named: str, root: Path, step_dir: Path, config_dirs: list[Path]) -> tuple[Path | None, list[str]]:
    """A file the config names, resolved as gpt-neox resolved it when training: an absolute path as it is; a
    relative one from the folder gpt-neox ran in (for the 20B release the checkpoint root's parent:
    ``./20B_checkpoints/20B_tokenizer.json``); then the file's name next to the checkpoint or its configs.
    Returns (the file or None, the places looked at, for the refusal)."""
    path = Path(named)
    candidates = [path] if path.is_absolute() else [root.parent / path]
    candidates += [d / path.name for d in dict.fromkeys([root, step_dir, *config_dirs])]
    for c in candidates:
        if c.exists():
            return c, []
    return None, [str(c) for c in candidates]


def find_tokenizer(root: Path, step_dir: Path, explicit: Path | None, *,
                   settings: TokenizerSettings | None = None, config_dirs: list[Path] | None = None,
                   strict: bool = True) -> TokenizerSource | None:
    """The tokenizer to carry: ``--tokenizer``; else the config's ``vocab-file`` (and ``merge-file``); else a
    ``*tokenizer*.json`` or ``tokenizer.model`` next to the checkpoint. A vocab-file the config names that cannot
    be found is refused (``strict``) rather than silently giving a model without its tokenizer."""
    settings = settings or TokenizerSettings()
    config_dirs = config_dirs or []
    merges = None
    if settings.merge_file:
        merges = _named_file(settings.merge_file, root, step_dir, config_dirs)[0]
    if explicit is not None:
        if not Path(explicit).exists():
            raise CheckpointError(f"{explicit}: no such tokenizer file")
        return tokenizer_source(Path(explicit), GIVEN, merges=merges)
    if settings.vocab_file:
        found, looked = _named_file(settings.vocab_file, root, step_dir, config_dirs)
        if found is not None:
            return tokenizer_source(found, "vocab-file of the config", merges=merges)
        if strict:
            raise CheckpointError(
                f"the config's vocab-file {settings.vocab_file!r} ({settings.tokenizer_type or 'tokenizer'}) is not "
                f"there (looked for {few(looked, n=4)}); pass the tokenizer the model was trained with: "
                "--tokenizer FILE")
        return None
    for d in (root, step_dir):
        found = sorted(p for p in d.glob("*tokenizer*.json") if p.is_file() and "config" not in p.name)
        found += [p for p in (d / "tokenizer.model",) if p.is_file()]
        if found:
            return tokenizer_source(found[0], "next to the checkpoint")
    return None


def _scan_ranks(step_dir: Path) -> tuple[str, dict[int, set[int]]]:
    """Layout and {layer index: {ranks}} (sequential: {-1: {ranks}})."""
    pipe: dict[int, set[int]] = {}
    seq: set[int] = set()
    for p in step_dir.iterdir():
        if m := _PIPE_FILE.match(p.name):
            pipe.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
        elif m := _SEQ_FILE.match(p.name):
            seq.add(int(m.group(1)))
    if pipe:
        return "pipeline", pipe
    if seq:
        return "sequential", {-1: seq}
    raise CheckpointError(f"{step_dir}: no layer_*-model_*-model_states.pt or mp_rank_*_model_states.pt files")


def open_checkpoint(
    src: Path, *, config_path: Path | None = None, tokenizer_path: Path | None = None, strict: bool = True
) -> Checkpoint:
    """Locate everything and check file presence and rank counts (no tensor data is read).

    ``strict=False`` records missing files in ``missing_files`` instead of raising (for ``inspect``).
    """
    missing_files: list[str] = []
    root, step_dir = find_step_dir(Path(src))
    layout, ranks = _scan_ranks(step_dir)
    config, config_source = find_config(root, step_dir, config_path)

    if layout == "pipeline":
        tp = max(len(r) for r in ranks.values())
        expected_layers = model_layers(config, with_readout=True)
        readout = config.readout_index
        if config.tie_word_embeddings and readout not in ranks:
            expected_layers = model_layers(config, with_readout=False)
        problems: list[str] = []
        missing_problems: list[str] = []
        for layer in expected_layers:
            have = ranks.get(layer.index, set())
            missing = sorted(set(range(tp)) - have)
            if missing:
                names = [pipeline_file_name(layer.index, r) for r in missing]
                missing_files += names
                missing_problems.append(f"{layer.label}: missing {', '.join(names)}")
            extra = sorted(have - set(range(tp)))
            if extra:
                problems.append(f"{layer.label}: unexpected ranks {extra} (TP degree {tp})")
        known = {layer.index for layer in expected_layers}
        stray = sorted(set(ranks) - known)
        if stray:
            problems.append(
                f"layer files {few(stray)} do not fit num_layers={config.num_layers} from {config_source} "
                f"(expected layers {few(sorted(known))})"
            )
        if problems or (strict and missing_problems):
            raise CheckpointError(f"{step_dir}: " + few(missing_problems + problems, sep="; "))
    else:
        have = ranks[-1]
        # n rank files must be ranks 0..n-1: a rank >= n is named (with the ranks it leaves missing) without
        # ever sizing anything by a number taken from a file name.
        tp = len(have)
        stray = sorted(r for r in have if r >= tp)
        if stray:
            gaps = [sequential_file_name(r) for r in sorted(set(range(tp)) - have)]
            raise CheckpointError(
                f"{step_dir}: {few([sequential_file_name(r) for r in stray])} do not fit {tp} rank files "
                f"(ranks 0..{tp - 1}); missing {few(gaps)}, or stray files to remove")
        expected_layers = None  # from the module keys, below (after the TP check)

    problems = config.tp_model_parallel_check(tp)
    if problems:
        raise ConfigError(f"{config_source}: " + "; ".join(problems))
    ymls = _yaml_files(root, step_dir, config_path)
    tokenizer = find_tokenizer(root, step_dir, tokenizer_path, settings=tokenizer_settings(*ymls) if ymls else None,
                               config_dirs=list(dict.fromkeys(p.parent for p in ymls)), strict=strict)
    ckpt = Checkpoint(
        root=root, step_dir=step_dir, layout=layout, tp_degree=tp, config=config, config_source=config_source,
        layers=expected_layers or [], tokenizer=tokenizer, missing_files=missing_files,
    )
    if expected_layers is None:
        ckpt.layers = _sequential_layers(ckpt)
    log.debug("checkpoint %s: layout %s, TP %d, %d layers", step_dir, layout, tp, len(ckpt.layers))
    if tokenizer is not None:
        log.info("tokenizer: %s", tokenizer.describe())
    return ckpt
