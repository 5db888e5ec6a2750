"""The plan that tools/reorganize_tests.py applies: which test goes to which file, by behaviour (issue 17, point 7).

Data only. Written from /work/tools/test_moves.md (against an older tree) and updated for the tree after the
first wave (test_key_generations, test_source_reader, test_output_folder, test_terminal_output, ...).

MOVES[source][test] = destination file, or KEEP (stays). MOVES[source]["*"] is the default for every test of
the source that is not listed, so tests added later to an old file still land somewhere; a test file that
is not a key of MOVES makes the script fail (add it here). RENAMES renames a moved test where its name
would collide in the destination. SHARED names module-level helpers/fixtures that get ONE home in
tests/conftest.py: a (source, name) whose new name conftest already defines is folded into it (the source
copy is deleted and every reference renamed); otherwise the definition moves into conftest under the new
name (SHARED_TEXT may give the conftest text instead of the source's). HELPER_RENAMES renames a helper that
travels with its tests. DESTINATIONS gives the docstring of each file the script creates.
"""

KEEP = "keep"
MOVES = {
 "test_attack_merge.py": {
   "test_a_symlink_planted_as_the_lock_is_refused_and_nothing_outside_out_is_touched": 'test_output_folder.py',
   "test_a_directory_planted_as_the_lock_is_named": 'test_output_folder.py',
   "test_a_stale_lock_file_of_a_dead_pid_is_taken_over": 'test_output_folder.py',
   "test_synth_of_a_size_that_does_not_fit_on_disk_is_refused_before_writing": 'test_cli.py',
   "test_synth_of_a_size_that_does_not_fit_in_memory_is_refused_before_writing": 'test_cli.py',
   "test_synth_heads_zero_is_an_error_not_the_default": 'test_cli.py',
   "test_llama_blocks_of_different_key_generations_are_refused": 'test_llama.py',
   "test_a_bad_latest_file_is_a_one_line_checkpoint_error": 'test_source_reader.py',
   "test_a_non_whole_number_in_the_neox_yaml_is_a_config_error": 'test_config.py',
   "test_reshard_of_a_view_heavy_checkpoint_reads_each_shared_storage_once": 'test_reshard.py',
   "test_reshard_of_a_corrupt_flat_buffer_fails_before_writing": 'test_reshard.py',
   "test_a_storage_entry_redirected_to_another_storages_bytes_fails_its_own_crc": 'test_source_reader.py',
   "test_a_tokenizer_bigger_than_the_embedding_is_refused": 'test_tokenizer.py',
   "*": 'test_cli.py',
 },
 "test_gguf.py": {
   "*": KEEP,
 },
 "test_hub_output.py": {
   "*": KEEP,
 },
 "test_messages_and_units.py": {
   "*": KEEP,
 },
 "test_mistral.py": {
   "*": KEEP,
 },
 "test_perplexity.py": {
   "*": KEEP,
 },
 "test_reward_models.py": {
   "*": KEEP,
 },
 "test_reward_split.py": {
   "*": KEEP,
 },
 "test_split_key_names.py": {
   "*": KEEP,
 },
 "test_split_streaming.py": {
   "*": KEEP,
 },
 "test_tokenizer_sources.py": {
   "*": KEEP,
 },
 "test_bench_smoke.py": {
   "*": KEEP,
 },
 "test_cli.py": {
   "test_inspect_json": 'test_inspect.py',
   "test_inspect_reports_missing_files": 'test_inspect.py',
   "*": KEEP,
 },
 "test_config.py": {
   "*": KEEP,
 },
 "test_deepspeed_load.py": {
   "*": KEEP,
 },
 "test_errors.py": {
   "test_missing_rank_file": 'test_source_reader.py',
   "test_rank_count_differs_between_layers": 'test_source_reader.py',
   "test_shape_mismatch_between_ranks_names_key_and_ranks": 'test_rules.py',
   "test_shape_against_config": 'test_rules.py',
   "test_unknown_key_names_file_and_key": 'test_rules.py',
   "test_known_derived_buffers_are_dropped": 'test_rules.py',
   "test_replica_divergence_fails_beyond_tolerance": 'test_rules.py',
   "test_nonfinite_weights_fail_unless_allowed": 'test_merge.py',
   "test_missing_config_asks_for_one": 'test_config.py',
   "test_hostile_layer_file_is_refused_through_the_cli": 'test_ptfile.py',
   "*": 'test_rules.py',
 },
 "test_fuzz_pickle.py": {
   "*": 'test_ptfile.py',
 },
 "test_layers.py": {
   "*": KEEP,
 },
 "test_llama.py": {
   "*": KEEP,
 },
 "test_merge_model.py": {
   "test_tokenizer_and_config_are_written_for_auto_tokenizer": 'test_tokenizer.py',
   "test_resume_keeps_good_layers_and_redoes_damaged_ones": 'test_resume.py',
   "test_rerun_over_a_complete_output_reuses_everything": 'test_resume.py',
   "test_a_foreign_non_empty_output_folder_is_refused_unless_forced": 'test_output_folder.py',
   "*": 'test_merge.py',
 },
 "test_perf_checks.py": {
   "test_output_is_byte_identical_to_before": 'test_merge.py',
   "test_fast_path_equals_general_path_across_staging_boundaries": 'test_merge.py',
   "test_crc32_matches_zlib_and_falls_back": 'test_source_reader.py',
   "test_flipped_source_byte_fails_the_crc": 'test_source_reader.py',
   "test_nonfinite_counter_matches_isfinite_in_any_blocks": 'test_merge.py',
   "test_inf_in_the_source_fails_the_merge": 'test_merge.py',
   "test_manifest_records_the_algorithm_and_every_files_digest": 'test_output_folder.py',
   "test_tampered_output_is_detected_under_either_hash": 'test_output_folder.py',
   "test_old_sha256_manifest_still_verifies": 'test_output_folder.py',
   "test_resume_under_another_hash_reuses_layers_and_rehashes_them": 'test_resume.py',
   "test_unknown_hash_is_refused": 'test_output_folder.py',
   "test_streams_direct_only_where_it_is_byte_identical": 'test_merge.py',
   "test_atomic_write_returns_the_digest_it_is_asked_for": 'test_writer.py',
   "*": 'test_merge.py',
 },
 "test_placement.py": {
   "*": KEEP,
 },
 "test_polish.py": {
   "test_a_non_whole_number_in_a_hugging_face_config_is_a_config_error": 'test_config.py',
   "test_a_directory_in_place_of_the_manifest_is_an_output_error": 'test_output_folder.py',
   "test_an_empty_item_in_verify_ids_is_a_usage_error": 'test_verify.py',
   "test_split_and_reshard_refuse_a_broken_tokenizer_as_merge_does": 'test_tokenizer.py',
   "test_split_still_copies_a_good_tokenizer": 'test_tokenizer.py',
   "test_inspect_reports_an_out_under_a_file_as_unusable": 'test_inspect.py',
   "test_inspect_says_a_usable_out_fits": 'test_inspect.py',
   "test_an_undecodable_manifest_in_out_makes_it_someone_elses_folder": 'test_output_folder.py',
   "test_a_deeply_nested_json_in_the_split_source_is_named_not_an_internal_error": 'test_split.py',
   "*": 'test_cli.py',
 },
 "test_ptfile.py": {
   "*": KEEP,
 },
 "test_reader_hardening.py": {
   "test_expanded_dropped_buffer_is_compared_without_expanding": 'test_rules.py',
   "test_dropped_buffer_shapes_are_checked": 'test_rules.py',
   "test_dropped_buffers_that_differ_across_ranks_are_refused": 'test_rules.py',
   "*": 'test_ptfile.py',
 },
 "test_real_writers.py": {
   "*": KEEP,
 },
 "test_reference_checkpoint.py": {
   "*": KEEP,
 },
 "test_reliability.py": {
   "test_fuzz_truncations_and_byte_flips": 'test_source_reader.py',
   "test_flipped_tensor_byte_is_caught_by_crc": 'test_source_reader.py',
   "test_bookkeeping_files_never_run_code": 'test_ptfile.py',
   "test_bad_last_layer_fails_before_anything_is_written": 'test_rules.py',
   "test_not_enough_disk_is_refused_up_front": 'test_output_folder.py',
   "test_disk_full_mid_merge_is_clear_and_resumable": 'test_resume.py',
   "test_sigkill_at_any_point_then_rerun_is_byte_identical": 'test_resume.py',
   "test_ctrl_c_stops_cleanly_and_says_how_to_resume": 'test_resume.py',
   "*": 'test_resume.py',
 },
 "test_reshard.py": {
   "*": KEEP,
 },
 "test_rules.py": {
   "*": KEEP,
 },
 "test_safety.py": {
   "test_resume_redoes_a_layer_file_replaced_by_a_same_size_different_one": 'test_resume.py',
   "test_a_second_merge_into_a_locked_output_is_refused_with_the_holders_pid": 'test_output_folder.py',
   "test_two_real_merges_into_one_output": 'test_output_folder.py',
   "test_verify_hashes_the_index_an_index_redirected_to_an_added_file_fails": 'test_verify.py',
   "test_a_folder_without_manifest_fails_integrity_unless_no_manifest": 'test_verify.py',
   "test_small_files_are_hashed_even_above_the_weight_hashing_threshold": 'test_verify.py',
   "test_ctrl_c_in_a_no_op_rerun_never_leaves_the_output_without_its_manifest": 'test_resume.py',
   "test_a_foreign_output_folder_loses_nothing_not_even_files_named_like_our_temporaries": 'test_output_folder.py',
   "test_force_deletes_only_listed_files_named_like_neoxconvs_outputs": 'test_output_folder.py',
   "test_a_config_with_absurd_num_layers_is_fast_and_its_errors_short": 'test_config.py',
   "test_huge_max_position_embeddings_does_not_allocate_huge_rope_tables": 'test_verify.py',
   "test_out_is_a_file": 'test_output_folder.py',
   "test_out_is_a_dangling_symlink": 'test_output_folder.py',
   "test_out_on_a_read_only_filesystem": 'test_output_folder.py',
   "test_hostile_tokenizer_json": 'test_tokenizer.py',
   "test_bad_config_values_are_config_errors": 'test_config.py',
   "test_nan_in_a_neox_yaml_is_a_config_error": 'test_config.py',
   "test_a_non_finite_replica_tolerance_is_a_usage_error": 'test_cli.py',
   "test_written_json_is_strict": 'test_output_folder.py',
   "test_overlapping_safetensors_offsets_are_a_verification_error": 'test_verify.py',
   "test_an_output_of_the_previous_manifest_format_is_redone_not_refused": 'test_resume.py',
   "*": 'test_output_folder.py',
 },
 "test_split.py": {
   "test_cli_json_resume_and_foreign_folder": 'test_resume.py',
   "test_sigkill_mid_split_then_rerun_is_byte_identical": 'test_resume.py',
   "test_tokenizer_is_copied_and_sets_the_vocab_divisor": 'test_tokenizer.py',
   "*": KEEP,
 },
 "test_split_safety.py": {
   "test_split_resume_redoes_what_a_same_size_replaced_safetensors_file_feeds": 'test_resume.py',
   "test_reshard_resume_redoes_a_layer_file_replaced_by_a_same_size_different_one": 'test_resume.py',
   "test_an_output_of_the_previous_manifest_format_is_redone_not_refused": 'test_resume.py',
   "test_ctrl_c_in_a_no_op_rerun_never_leaves_the_output_without_its_manifest": 'test_resume.py',
   "test_bad_hf_config_values_are_config_errors": 'test_config.py',
   "*": 'test_output_folder.py',
 },
 "test_ux.py": {
   "test_verify_a_path_that_does_not_exist_is_a_usage_error": 'test_verify.py',
   "test_verify_a_folder_that_is_not_a_merge_output_is_an_input_error": 'test_verify.py',
   "test_verify_usage_errors_exit_2": 'test_verify.py',
   "test_inspect_with_a_rank_file_missing_lists_it_and_exits_4": 'test_inspect.py',
   "test_missing_optional_dependency_is_refused_up_front": 'test_cli.py',
   "test_reduced_precision_merge_passes_against_on_cpu": 'test_verify.py',
   "test_unrounded_weights_keep_the_tight_tolerance": 'test_verify.py',
   "test_bf16_tolerance_still_catches_a_wrong_merge": 'test_verify.py',
   "test_tokenizer_config_gives_input_ids_and_attention_mask_and_generate_works": 'test_tokenizer.py',
   "test_merge_json_is_one_object_on_stdout": 'test_cli.py',
   "test_summary_says_time_rate_and_dtype_in_the_progress_bars_units": 'test_cli.py',
   "test_inspect_plan_matches_what_merge_writes": 'test_inspect.py',
   "test_inspect_text_shows_thousands_separators_and_the_plan": 'test_inspect.py',
   "test_resume_shows_that_it_rechecks_finished_files": 'test_resume.py',
   "test_remerge_with_other_options_names_the_difference": 'test_resume.py',
   "test_demo_says_where_its_files_are": 'test_cli.py',
   "test_demo_with_workdir_says_what_it_kept": 'test_cli.py',
   "test_synth_writes_a_checkpoint_of_the_chosen_size": 'test_cli.py',
   "test_tests_honour_neoxconv_tokenizer": 'test_tokenizer.py',
   "*": 'test_cli.py',
 },
 "test_verify.py": {
   "test_text_prompt_with_the_real_tokenizer": 'test_tokenizer.py',
   "test_prompt_without_tokenizer_is_a_clear_error": 'test_tokenizer.py',
   "*": KEEP,
 },
 "test_verify_hostile.py": {
   "test_split_names_a_malformed_hf_header": 'test_split.py',
   "test_split_refuses_a_deeply_nested_header": 'test_split.py',
   "test_split_refuses_a_tensor_held_by_two_shards": 'test_split.py',
   "test_tokenizer_that_does_not_match_the_model": 'test_tokenizer.py',
   "test_unreadable_tokenizer_is_an_input_error": 'test_tokenizer.py',
   "test_rope_settings_neoxconv_would_ignore_are_refused": 'test_config.py',
   "test_llama_rope_theta_spellings_that_disagree_are_refused": 'test_config.py',
   "test_demo_with_a_tp_its_model_cannot_take_is_a_usage_error": 'test_cli.py',
   "*": 'test_verify.py',
 },
 "test_writer.py": {
   "*": KEEP,
 },
 # ----- files added by the first wave (issues 17 and 18) -----
 "test_key_generations.py": {
   "*": KEEP,
 },
 "test_transformer_engine.py": {
   "*": KEEP,
 },
 "test_output_folder.py": {
   "test_no_tokenizer_never_removes_a_folder_or_a_link_target": 'test_tokenizer.py',
   "test_a_hand_edited_manifest_cannot_make_finish_remove_files_it_did_not_write": 'test_tokenizer.py',
   "test_merge_resume_without_allow_nonfinite_redoes_the_nan_layer_and_fails": 'test_resume.py',
   "test_merge_resume_with_a_lower_replica_tolerance_redoes_the_layer_and_fails": 'test_resume.py',
   "test_merge_resume_after_the_config_changed_redoes_every_layer": 'test_resume.py',
   "test_resume_after_a_crc32_collision_with_the_mtime_restored_redoes_the_layer": 'test_resume.py',
   "test_split_resume_redoes_a_file_of_a_config_changed_in_place": 'test_resume.py',
   "test_split_fp16_overflow_fails_unless_allowed_and_a_resume_does_not_keep_it": 'test_resume.py',
   "test_a_split_output_with_the_previous_manifest_name_resumes": 'test_resume.py',
   "test_split_and_reshard_write_the_tokenizer_under_its_own_name_whatever_it_is_called": 'test_tokenizer.py',
   "*": KEEP,
 },
 "test_ptarchive.py": {
   "*": KEEP,
 },
 "test_source_reader.py": {
   "*": KEEP,
 },
 "test_split_dropped_tensors.py": {
   "*": KEEP,
 },
 "test_terminal_output.py": {
   "test_a_tokenizer_the_library_refuses_is_not_copied": 'test_tokenizer.py',
   "test_a_tokenizer_the_library_loads_is_copied_byte_for_byte": 'test_tokenizer.py',
   "test_without_the_library_the_json_checks_still_hold": 'test_tokenizer.py',
   "test_the_size_bound_comes_before_any_parse": 'test_tokenizer.py',
   "*": KEEP,
 },
 "test_verify_qkv_layout.py": {
   "*": KEEP,
 },
 "test_folder_races.py": {
   "*": KEEP,
 },
 # ----- destinations created by this plan (they keep what they hold when the script runs again) -----
 "test_inspect.py": {
   "*": KEEP,
 },
 "test_merge.py": {
   "*": KEEP,
 },
 "test_resume.py": {
   "*": KEEP,
 },
 "test_tokenizer.py": {
   "*": KEEP,
 },
}
# names that would collide in the destination: (source file, old name) -> new name
RENAMES = {
 ("test_safety.py", "test_out_is_a_file"):
     "test_merge_out_is_a_file",
 ("test_safety.py", "test_out_is_a_dangling_symlink"):
     "test_merge_out_is_a_dangling_symlink",
 ("test_safety.py", "test_out_on_a_read_only_filesystem"):
     "test_merge_out_on_a_read_only_filesystem",
 ("test_split_safety.py", "test_out_is_a_file"):
     "test_split_reshard_out_is_a_file",
 ("test_split_safety.py", "test_out_is_a_dangling_symlink"):
     "test_split_reshard_out_is_a_dangling_symlink",
 ("test_split_safety.py", "test_out_on_a_read_only_filesystem"):
     "test_split_reshard_out_on_a_read_only_filesystem",
 ("test_safety.py", "test_a_foreign_output_folder_loses_nothing_not_even_files_named_like_our_temporaries"):
     "test_a_foreign_output_folder_loses_nothing_to_merge",
 ("test_split_safety.py", "test_a_foreign_output_folder_loses_nothing_not_even_files_named_like_our_temporaries"):
     "test_a_foreign_output_folder_loses_nothing_to_split_or_reshard",
 ("test_safety.py", "test_ctrl_c_in_a_no_op_rerun_never_leaves_the_output_without_its_manifest"):
     "test_ctrl_c_in_a_no_op_merge_rerun_never_leaves_the_output_without_its_manifest",
 ("test_split_safety.py", "test_ctrl_c_in_a_no_op_rerun_never_leaves_the_output_without_its_manifest"):
     "test_ctrl_c_in_a_no_op_split_or_reshard_rerun_never_leaves_the_output_without_its_manifest",
 ("test_safety.py", "test_an_output_of_the_previous_manifest_format_is_redone_not_refused"):
     "test_a_merge_output_of_the_previous_manifest_format_is_redone_not_refused",
 ("test_split_safety.py", "test_an_output_of_the_previous_manifest_format_is_redone_not_refused"):
     "test_a_split_or_reshard_output_of_the_previous_manifest_format_is_redone_not_refused",
}

# (source, helper) -> its name in tests/conftest.py (see the module docstring: fold or move)
SHARED = {
    # the committed fixture merged once (conftest.merged_fixture; copy it to change it: merged_fixture_copy)
    ("test_polish.py", "merged"): "merged_fixture",
    ("test_safety.py", "merged"): "merged_fixture",
    ("test_ux.py", "fixture_out"): "merged_fixture",
    ("test_terminal_output.py", "merged"): "merged_fixture",
    ("test_terminal_output.py", "hf_folder"): "merged_fixture",  # `return merged`: a merge's OUT split reads
    ("test_safety.py", "copy"): "merged_fixture_copy",
    # a private copy of the committed fixture
    ("test_safety.py", "src"): "src_copy",
    ("test_errors.py", "ckpt"): "src_copy",
    # make_checkpoint(2, "pipeline", "float32") merged once: (root, out)
    ("test_verify.py", "merged"): "merged_fp32",
    ("test_verify_hostile.py", "merged"): "merged_fp32",
    ("test_placement.py", "merged"): "merged_fp32",
    # constants and small helpers written several times
    **{(f, "STEP"): "STEP" for f in ("test_errors.py", "test_fuzz_pickle.py", "test_perf_checks.py",
                                     "test_reader_hardening.py", "test_reliability.py", "test_safety.py",
                                     "test_output_folder.py")},
    ("test_safety.py", "_bytes"): "folder_bytes",
    ("test_reliability.py", "_bytes"): "folder_bytes",
    ("test_ux.py", "_run"): "cli",
    # new in conftest: used by the tests of several behaviours
    ("test_reliability.py", "clean_merge"): "clean_merge",
    ("test_perf_checks.py", "merged_both"): "merged_both",
    ("test_perf_checks.py", "_model_files"): "model_files",
    ("test_merge_model.py", "_all_bytes"): "all_bytes",
    ("test_errors.py", "_rewrite"): "rewrite_pt",
    ("test_errors.py", "_assert_clean"): "assert_no_partial_output",
    ("test_errors.py", "_merge_fails"): "merge_fails",
    ("test_safety.py", "VERIFY"): "VERIFY",
    ("test_verify.py", "_verify_json"): "verify_json",
    ("test_verify_hostile.py", "_no_internal_error"): "no_internal_error",
    ("test_verify_hostile.py", "_header"): "safetensors_header",
    ("test_verify_hostile.py", "_rewrite_header"): "rewrite_safetensors_header",
    ("test_split_safety.py", "MANIFEST"): "NEOX_MANIFEST",
    ("test_split_safety.py", "_tree"): "tree_bytes",
    ("test_output_folder.py", "_tree"): "tree_bytes",
    ("test_split_safety.py", "_assert_manifest_proves"): "assert_manifest_proves",
    ("test_split_safety.py", "hf"): "hf_sharded",
    ("test_split_safety.py", "hf_copy"): "hf_copy",
    ("test_split_safety.py", "command"): "writer_command",
    ("test_verify_hostile.py", "_split"): "split_tp2",
    ("test_reader_hardening.py", "run_cli"): "run_cli",
    ("test_output_folder.py", "hf"): "hf_single",
    ("test_output_folder.py", "_poison"): "poison_pt",
    # Hugging Face folders (split's sources): test_split's helpers, imported by several files
    ("test_split.py", "TINY"): "TINY",
    ("test_split.py", "_make_hf"): "make_hf_folder",
    ("test_split.py", "hf_dir"): "hf_dir",
    ("test_split.py", "_hf_tensors"): "hf_tensors",
    ("test_split.py", "_bits"): "tensor_bits",
}

# conftest text for a SHARED name whose source body is not what the shared fixture should be
SHARED_TEXT = {
    "merged_both": '''
@pytest.fixture(scope="session")
def merged_both(merged_fixture, tmp_path_factory) -> Path:
    """The committed fixture merged under each hash: ``merged_both / "blake3"`` (``merged_fixture``'s files) and
    ``merged_both / "sha256"`` (``neoxconv merge --hash sha256``). Read-only: copy a folder to change it."""
    work = tmp_path_factory.mktemp("hashes")
    shutil.copytree(merged_fixture, work / "blake3")
    result = cli("merge", "-q", COMMITTED_FIXTURE, work / "sha256", "--hash", "sha256")
    if result.exit_code != 0:
        raise RuntimeError(f"merging {COMMITTED_FIXTURE} --hash sha256 failed: {result.output}")
    return work
''',
}

# (source, helper) -> new name, for a helper that travels with its tests (collisions the script would
# otherwise resolve with a suffix)
HELPER_RENAMES = {
    ("test_safety.py", "_HOLD_LOCK"): "_HOLD_MERGE_LOCK",
    ("test_split_safety.py", "_HOLD_LOCK"): "_HOLD_NEOX_LOCK",
    ("test_polish.py", "hf_model"): "hf_folder",
}

# docstrings of the files the script creates
DESTINATIONS = {
    "test_merge.py": "The merged model is right: Hugging Face loads what merge writes and its logits match the\n"
                     "reference model; dtypes, digests, the fast path and non-finite weights.",
    "test_resume.py": "Resume and re-run for merge, split and reshard: what is reused, what is redone and why; the\n"
                      "journal, Ctrl-C, SIGKILL, disk full and outputs of older manifest formats.",
    "test_tokenizer.py": "The tokenizer: found, copied, refused or hostile, in merge, split, reshard and verify.",
    "test_inspect.py": "`neoxconv inspect`: the plan, JSON, missing files and whether OUT can be written.",
}
