"""Mutation testing of the numerical and security core with cosmic-ray (not CI: about an hour on 2 cores).

For each module below, cosmic-ray writes one mutant at a time into a scratch copy of this checkout (the module's file
on disk, so the subprocesses and torchrun ranks that many tests start run the mutant too) and runs the tests that
MODULES maps to the module; a mutant is killed when they fail, survived when they pass. The scores per module are
printed at the end (and kept in the work folder, so --report prints them again without running anything).

Starting Python with torch costs ~2.5 s of CPU per test run, which for ~1,600 mutants is most of the budget: so the
test command is a small client of a fork server that imported torch, transformers and pytest once (never
gpt2_ascend) and forks a fresh pytest per mutant, which imports gpt2_ascend from the mutated files.

    python bench/mutation.py                          # every module (an hour or more on 2 shared cores)
    python bench/mutation.py losses.py data/text.py   # some modules (paths under gpt2_ascend/)
    python bench/mutation.py --jobs 2                 # two modules at a time
    python bench/mutation.py --report                 # the scores and survivors of the last run again

Needs cosmic-ray (pip install -r requirements/mutation.txt). docs/testing.md records the scores and judges every
survivor: killed by a test added for it, or equivalent for the reason written in EQUIVALENT below.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import resource
import select
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_WORKDIR = os.path.join(os.environ.get("TMPDIR", "/tmp"), "gpt2_ascend_mutation")
PYTEST = ["-x", "-q", "-p", "no:cacheprovider", "--no-header"]
TIMEOUT_MARK = "MUTATION-TIMEOUT"
CHILD_MEMORY_BYTES = 8 << 30  # per test process (and each process it starts): the tests need well under 2 GiB
CLIENT_ERROR_MARK = "MUTATION-CLIENT-ERROR"
NO_TESTS_MARK = "MUTATION-NO-TESTS: no mapped test runs the changed lines"
EXIT_MARK = "MUTATION-EXIT "

# module (under gpt2_ascend/) -> the tests that cover it, fastest first (pytest stops at the first failure). Many of
# them start subprocesses (train.py, torchrun): coverage measured in the test process would not see those, so the
# mapping is written out. torchrun layouts only for the parallel modules, and only those that run the module.
PARALLEL = "tests/test_parallel.py::test_layout_matches_one_process"
HF_INTEROP = "tests/test_hf_interop.py"
MODULES = {
    "data/text.py": ["tests/test_data_wikitext.py", "tests/test_data_store.py"],
    "safe_pickle.py": ["tests/test_safe_loading.py"],
    "safe_dcp.py": ["tests/test_safe_loading.py"],
    "losses.py": ["tests/test_model.py", "tests/test_eval.py", "tests/test_model_parity.py",
                  "tests/test_train_trainer.py::test_gradient_accumulation_equals_the_big_batch"],
    "lora.py": ["tests/test_lora_units.py", "tests/test_train_units.py", "tests/test_convert_lora.py",
                "tests/test_mindformers_lora.py",
                "tests/test_train_trainer.py::test_lora_trains_only_adapters_and_merges_exactly",
                "tests/test_train_trainer.py::test_lora_classifier_trains_its_head_and_saves_it_in_the_adapter",
                f"{HF_INTEROP}::test_hf_causal_lm_adapter_in_load_adapter_merge_lora_and_generate",
                f"{HF_INTEROP}::test_hf_seq_cls_adapter_in_evaluate_and_merge_lora",
                f"{HF_INTEROP}::test_our_adapters_load_in_peft_on_plain_transformers",
                f"{HF_INTEROP}::test_training_continues_an_hf_adapter",
                "tests/test_safe_loading.py::test_pickled_numpy_data_and_adapter_are_refused"],
    "train/optim.py": ["tests/test_train_units.py", "tests/test_mindformers_numerics.py",
                       "tests/test_mindformers_reference.py",
                       "tests/test_train_trainer.py::test_step_matches_a_hand_written_adamw_step",
                       "tests/test_train_trainer.py::test_clipping_scales_the_update_by_exactly_max_norm_over_norm",
                       "tests/test_train_trainer.py::test_fp16_overflow_skips_the_step_and_lowers_the_scale",
                       "tests/test_train_trainer.py::test_fp16_recovers_once_the_scale_fits"],
    "generation.py": ["tests/test_generation.py", "tests/test_model.py", "tests/test_hf_habits.py"],
    "model.py": ["tests/test_model.py", "tests/test_model_parity.py", "tests/test_init.py", "tests/test_hf_habits.py",
                 "tests/test_generation.py", f"{HF_INTEROP}::test_forward_arguments_have_transformers_meaning",
                 f"{HF_INTEROP}::test_classifier_forward_arguments_have_transformers_meaning",
                 f"{HF_INTEROP}::test_unsupported_arguments_raise_type_error_naming_them",
                 "tests/test_faults.py::test_forward_with_labels_it_cannot_score_is_one_value_error",
                 "tests/test_faults.py::test_forward_with_ids_it_cannot_embed_is_one_value_error",
                 "tests/test_speed.py::test_compiled_blocks_keep_recompute_and_dropout_exact"],
    "parallel/clip.py": ["tests/test_parallel.py::test_distributed_clip_scales_by_exactly_max_norm_over_norm",
                         "tests/test_parallel.py::test_a_max_norm_that_is_not_positive_clips_nothing_on_either_path",
                         "tests/test_parallel.py::test_one_parameter_is_clipped_on_either_path",
                         "tests/test_train_trainer.py::test_clipping_scales_the_update_by_exactly_max_norm_over_norm",
                         "tests/test_train_trainer.py::test_step_matches_a_hand_written_adamw_step",
                         "tests/test_mindformers_numerics.py::test_mindformers_clip_formula",
                         f"{PARALLEL}[tp-2-layout2]", f"{PARALLEL}[pp_1f1b-2-layout5]"],
    "parallel/tensor_parallel.py": ["tests/test_model.py",
                                    "tests/test_parallel.py::test_only_modules_a_model_or_stage_holds_are_planned",
                                    "tests/test_parallel.py::test_sequence_parallel_keeps_the_residual_stream_split_on_"
                                    "the_sequence", f"{PARALLEL}[tp-2-layout2]", f"{PARALLEL}[tp_sp-2-layout3]",
                                    "tests/test_parallel.py::test_tensor_parallel_finetunes_nonzero_biases_like_one_process",
                                    "tests/test_parallel.py::test_classifier_layouts_match_one_process[cls_tp_sp-layout2]"],
    "parallel/pipeline.py": ["tests/test_init.py",
                             "tests/test_model.py::test_pipeline_stages_chained_in_one_process_give_the_whole_models_"
                             "logits",
                             "tests/test_model.py::test_pipeline_stages_split_the_layers_contiguously_the_first_taking_"
                             "the_extra_ones",
                             f"{PARALLEL}[pp_1f1b-2-layout5]", f"{PARALLEL}[pp_gpipe-2-layout4]",
                             f"{PARALLEL}[pp_accum-2-layout8]", f"{PARALLEL}[tp_pp-4-layout7]",
                             "tests/test_parallel.py::test_classifier_layouts_match_one_process[cls_pp-layout0]"],
}
# the tests above that run the module in subprocesses (prefixes of node ids): every mutant of the module runs them
SUBPROCESS_TESTS = {
    "safe_pickle.py": ["tests/test_safe_loading.py::test_hostile_file_is_refused_in_one_line"],
    "safe_dcp.py": ["tests/test_safe_loading.py::test_hostile_file_is_refused_in_one_line"],
    "parallel/clip.py": [PARALLEL],
    "parallel/tensor_parallel.py": ["tests/test_parallel.py"],
    "parallel/pipeline.py": ["tests/test_parallel.py"],
}

# cosmic-ray's operators kept: one mutant per realistic slip at each site (a sign, an inverse operation, an off-by-one
# comparison or constant, a flipped or short-circuited condition, a lost decorator, a loop never run, an except that
# no longer catches). Its other binary and comparison replacements (a + b -> a >> b, a == b -> a >= b) mostly crash
# at once or repeat these, and AddNot (`if x` -> `if not x` on every condition) repeats the == / is / not flips
# where a condition compares; together they would have tripled the run.
KEPT_OPERATORS = (
    r"ReplaceBinaryOperator_(Add_Sub|Sub_Add|Mul_Div|Div_Mul|FloorDiv_Div|Mod_FloorDiv|Pow_Mul|BitOr_BitAnd"
    r"|BitAnd_BitOr|BitXor_BitOr|LShift_RShift|RShift_LShift)"
    r"|ReplaceComparisonOperator_(Eq_NotEq|NotEq_Eq|Lt_LtE|LtE_Lt|Gt_GtE|GtE_Gt|Is_IsNot|IsNot_Is)"
    r"|ReplaceUnaryOperator_Delete_(USub|Not|Invert)|ReplaceAndWithOr|ReplaceOrWithAnd|ReplaceTrueWithFalse"
    r"|ReplaceFalseWithTrue|ReplaceBreakWithContinue|ReplaceContinueWithBreak|NumberReplacer"
    r"|ZeroIterationForLoop|ExceptionReplacer|RemoveDecorator"
)

# Survivors that cannot change any behaviour: (module, the line before, the line after, why). Matched on the stripped
# source lines of the mutant's diff, so they hold while the code around them moves.
EQUIVALENT: list[tuple[str, str, str, str]] = [
    # parallel/clip.py, generation.py, model.py (judged by the lead)
    ("model.py", "pos = attention_mask.long().cumsum(-1) - 1", "pos = attention_mask.long().cumsum(1) - 1",
     "the mask is (batch, length) here, every other shape refused at the forward's entry: dim 1 is the last"),
    ("model.py", 'x = step(block, x, mask, cache, i, self.recompute if self.training and cache is None else "none")',
     'x = step(block, x, mask, cache, i, self.recompute if self.training or cache is None else "none")',
     "they differ only in eval mode without a cache, where recomputation then wraps the block in "
     "torch.utils.checkpoint: under no_grad that runs it once as is, with gradients it recomputes exactly "
     "(test_recompute_modes_same_loss_and_grads_with_dropout): the same numbers, another cost"),
    ("generation.py", "if s.repetition_penalty != 1.0:", "if s.repetition_penalty != 0.0:",
     "a penalty of 1.0 divides and multiplies scores by 1, exactly: the guard only saves the work (0.0 is refused "
     "by SamplingSettings.validate before the loop)"),
    ("generation.py", "k = min(k, scores.size(-1))", "k = min(k, scores.size(1))",
     "scores are (batch, vocab) in every call (process_logits): dim 1 is the last"),
    ("generation.py", "kth = torch.topk(scores, k, dim=-1).values[..., -1:]",
     "kth = torch.topk(scores, k, dim=1).values[..., -1:]", "the same: (batch, vocab) scores"),
    ("generation.py", "remove = remove_sorted.scatter(-1, order, remove_sorted)",
     "remove = remove_sorted.scatter(1, order, remove_sorted)", "the same: (batch, vocab) scores"),
    ("model.py", "force_download: bool = False, token=None, trust_remote_code: bool = False, **config_overrides):",
     "force_download: bool = False, token=None, trust_remote_code: bool = True, **config_overrides):",
     "trust_remote_code is accepted for transformers' callers and only type-checked: no code is ever run from a "
     "model folder, whatever it says (test_safe_loading.py)"),
    ("model.py", "low_cpu_mem_usage: bool = True, revision=None, local_files_only: bool = False, cache_dir=None,",
     "low_cpu_mem_usage: bool = False, revision=None, local_files_only: bool = False, cache_dir=None,",
     "low_cpu_mem_usage is accepted for transformers' callers and only type-checked: the weights always go tensor by "
     "tensor into a model built on the meta device (test_low_cpu_mem_usage_loads_without_a_second_copy)"),
    ("model.py", "return pos.masked_fill(attention_mask == 0, 1)", "return pos.masked_fill(attention_mask == 0, 2)",
     "the same as 1 -> 0 below: any in-range position id for a pad slot"),
    ("model.py", "return (torch.arange(T, device=input_ids.device, dtype=torch.int32) * real).argmax(-1)",
     "return (torch.arange(T, device=input_ids.device, dtype=torch.int32) * real).argmax(1)",
     "`real` is (batch, length) (the mask or the ids, both checked 2-D at the forward's entry): dim 1 is the last"),
    ("model.py", "return pos.masked_fill(attention_mask == 0, 1)", "return pos.masked_fill(attention_mask == 0, 0)",
     "any in-range position id for a pad slot: it changes only that slot's own hidden state, which the mask hides "
     "from every real query and which no loss, pooling or generation step reads (each row alone equals it in a "
     "padded batch: test_model.py / test_generation.py); transformers' own pad-slot states differ from ours anyway"),
    ("train/optim.py", 'found = optimizer.param_groups[0].get("update_rule", "torch")',
     'found = optimizer.param_groups[-1].get("update_rule", "torch")',
     "every group carries the same update_rule (build_optimizer / use_mindspore_rule set it on all)"),
    ("train/optim.py", "def resolve_total_steps(total_steps: int, steps_per_epoch: int, epochs: int, max_steps: int = -1) "
     "-> int:", "def resolve_total_steps(total_steps: int, steps_per_epoch: int, epochs: int, max_steps: int = -2) "
     "-> int:", "a default max_steps of -1 or -2 is equally 'not set' (only max_steps >= 1 is used)"),
    ("train/optim.py", "def resolve_total_steps(total_steps: int, steps_per_epoch: int, epochs: int, max_steps: int = -1) "
     "-> int:", "def resolve_total_steps(total_steps: int, steps_per_epoch: int, epochs: int, max_steps: int = -0) "
     "-> int:", "the same: 0 is 'not set' too (test_total_steps_minus_one_means_dataset_size_times_epochs)"),
    ("train/optim.py", "num_cycles: float = 0.5  # cosine: waves over the decay (0.5: one half-cosine)",
     "num_cycles: float = -0.5  # cosine: waves over the decay (0.5: one half-cosine)",
     "num_cycles enters only as cos(pi * num_cycles * 2 * progress), and cos is even"),
    ("parallel/clip.py", "if max_norm and max_norm > 0 and grads:  # 0, None or below: no clipping (as clip_grad_norm)",
     "if max_norm and max_norm >= 0 and grads:  # 0, None or below: no clipping (as clip_grad_norm)",
     "they differ only at max_norm == 0, where `max_norm and` is already false"),
    ("parallel/clip.py", "if max_norm and max_norm > 0:", "if max_norm and max_norm >= 0:",
     "they differ only at max_norm == 0, where `max_norm and` is already false"),
    ("parallel/clip.py", "torch._foreach_mul_(grads, clip_coefficient(total, max_norm, rule).to(grads[0].device))",
     "torch._foreach_mul_(grads, clip_coefficient(total, max_norm, rule).to(grads[-1].device))",
     "a rank's gradients all live on its one device (grads[1] fails on one gradient: "
     "test_one_parameter_is_clipped_on_either_path)"),
    ("data/text.py", "files = tokenizer_files(path) if path and os.path.isdir(path) else []",
     "files = tokenizer_files(path) if path or os.path.isdir(path) else []",
     "tokenizer_files lists the path's vocab.json / merges.txt / tokenizer.json that exist: none unless path is a "
     "directory, and '' or isdir('') is False"),
    ("data/text.py", "while len(text) - start > chunk_chars:", "while len(text) + start > chunk_chars:",
     "once len(text) - start <= chunk_chars, text.find('\\n', start + chunk_chars) is -1 and the loop breaks: "
     "the condition only spares that find"),
    ("data/text.py", "while len(text) - start > chunk_chars:", "while len(text) - start >= chunk_chars:",
     "the same: at len(text) - start == chunk_chars the find starts at len(text) and gives -1"),
    ("parallel/clip.py", "if pp_group is not None and dist.get_world_size(pp_group) > 1:",
     "if pp_group is not None and dist.get_world_size(pp_group) > 0:",
     "an all_reduce over a group of one rank returns its input: it only costs a call"),
    ("parallel/clip.py", "if pp_group is not None and dist.get_world_size(pp_group) > 1:",
     "if pp_group is not None and dist.get_world_size(pp_group) >= 1:", "the same"),
    ("parallel/clip.py", "device = grads[0].device", "device = grads[-1].device",
     "a rank's gradients all live on its one device"),
    ("generation.py", "@functools.lru_cache(maxsize=None)", "",
     "it keeps a constant (a blank GenerationConfig, the defaults read from it; callers only read them): without "
     "it each call builds the same values again"),
    ("generation.py", "for t in self.cache.keys + self.cache.values + [self.slots, self.position]:",
     "for t in []:",
     "marking the buffers static tells CUDA graphs their addresses never change; unmarked, the compiled step "
     "reads and writes the same tensors (on CUDA, mutated inputs make inductor skip the graph: slower, the "
     "same tokens)"),
    ("generation.py", 'if self.step_fn is not _forward_last and tokens.device.type == "cuda":',
     'if self.step_fn is _forward_last and tokens.device.type == "cuda":',
     "CUDA only, not judged on CPU: off CUDA both conditions are False (a CPU step never marks a CUDA graph "
     "step: test_a_cpu_compile_that_fails_to_build_falls_back_with_one_warning); on CUDA "
     "test_compiled_cuda_graph_decode_equals_eager_on_gpu runs it when a GPU is lent"),
    ("generation.py", "probs = torch.softmax(scores, dim=-1)", "probs = torch.softmax(scores, dim=1)",
     "the same: (batch, vocab) scores"),
    ("generation.py", "if eos is not None and ("
     "(i + 1) % check_every == 0 or last) and bool(all_done[:i + 1].any()):",
     "if eos is not None and ("
     "(i + 2) % check_every == 0 or last) and bool(all_done[:i + 1].any()):",
     "moves the accelerator's stop checks one step earlier: the output is cut where all_done says, exactly, "
     "whichever step the check runs at (checking every step, on CPU or with a streamer, (i + 2) % 1 == 0 as well)"),
    ("generation.py", "if eos is not None and ("
     "(i + 1) % check_every == 0 or last) and bool(all_done[:i + 1].any()):",
     "if eos is not None and ("
     "(i + 1) % check_every == 0 or last) and bool(all_done[:i + 2].any()):",
     "all_done[i + 1] is still False when step i reads it (set at step i + 1): the same any()"),
    ("generation.py", "cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)",
     "cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=1)", "the same: (batch, vocab) scores"),
    ("generation.py", "self.position = torch.zeros(1, dtype=torch.long, device=device)",
     "self.position = torch.zeros(2, dtype=torch.long, device=device)",
     "two equal entries (every step fills the buffer with its slot): the step's one token is broadcast to two "
     "identical queries at that slot, which write the same key twice and give the same last logits: twice the "
     "work, the same tokens"),
    ("generation.py", "ACCELERATOR_STOP_CHECK = 8", "ACCELERATOR_STOP_CHECK = 9",
     "a tuning constant (device syncs saved vs steps run past the stop): any interval gives the every-step output "
     "(test_checking_for_the_stop_every_few_steps_gives_the_every_step_output, at 3 and 8)"),
    ("generation.py", "ACCELERATOR_STOP_CHECK = 8", "ACCELERATOR_STOP_CHECK = 7", "the same: a tuning constant"),
    ("generation.py", "cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)",
     "cumulative = sorted_scores.softmax(dim=1).cumsum(dim=-1)", "the same: (batch, vocab) scores"),
    ("generation.py", "self.padded = False", "self.padded = True",
     "a placeholder: prefill() sets it from the mask before any step() reads it"),
    ("generation.py", "if eos is not None and ("
     "(i + 1) % check_every == 0 or last) and bool(all_done[:i + 1].any()):",
     "if eos is not None and ("
     "(i - 1) % check_every == 0 or last) and bool(all_done[:i + 1].any()):",
     "the checks at steps 1, 4, 7, ... instead of 2, 5, 8 (every step where the interval is 1): the output is cut "
     "where all_done says, exactly, whichever step the check runs at"),
    ("generation.py", "return texts[0] if single else texts", "return texts[-1] if single else texts",
     "a single prompt gives a list of one text: its first is its last"),
    ("generation.py", "repetition_penalty: float = 1.0, seed: Optional[int] = None):",
     "repetition_penalty: float = 2.0, seed: Optional[int] = None):",
     "a validator's default: a penalty of 2.0 passes wherever 1.0 does"),
    ("generation.py", "return out[0] if squeeze else out", "return out[-1] if squeeze else out",
     "a 1-D prompt is one row, and the decoder here returns one sequence per row: its first is its last"),
    ("generation.py", "use_cache=True).last_hidden_state", "use_cache=False).last_hidden_state",
     "the model reads and fills a cache it is passed whatever use_cache says (transformers' rule: it only decides "
     "whether a new cache is made and returned), and only last_hidden_state is read here"),
    ("generation.py", "seen = torch.zeros(B, vocab + 1, dtype=torch.bool, device=device)",
     "seen = torch.zeros(B, vocab + 2, dtype=torch.bool, device=device)",
     "a second spare column past the one padding is scattered into: both are sliced off ([:, :vocab])"),
    ("generation.py", "return scores.argmax(dim=-1)", "return scores.argmax(dim=1)", "the same: (batch, vocab) scores"),
    ("generation.py", "sorted_scores, order = torch.sort(scores, descending=False, dim=-1)",
     "sorted_scores, order = torch.sort(scores, descending=False, dim=1)", "the same: (batch, vocab) scores"),
    ("generation.py", "if s.temperature != 1.0:", "if s.temperature != 0.0:",
     "temperature 1.0 then divides by 1, exactly; 0.0 never reaches here (sampling refuses it in validate)"),
    ("generation.py", "if s.top_p < 1.0:", "if s.top_p < 2.0:",
     "top_p is at most 1 (validate): the same as `<= 1.0`, judged below"),
    ("generation.py", "temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,",
     "temperature: float = 2.0, top_k: int = 0, top_p: float = 1.0,",
     "a validator's default: temperature 2.0 passes wherever 1.0 does"),
    ("generation.py", "return out[0] if squeeze and isinstance(out, torch.Tensor) and out.size(0) == 1 else out",
     "return out[-1] if squeeze and isinstance(out, torch.Tensor) and out.size(0) == 1 else out",
     "one row: its first is its last"),
    ("generation.py",
     "penalized = torch.where(scores < 0, scores * s.repetition_penalty, scores / s.repetition_penalty)",
     "penalized = torch.where(scores <= 0, scores * s.repetition_penalty, scores / s.repetition_penalty)",
     "a score of exactly 0 times the penalty or over it is 0 either way"),
    ("generation.py", "if eos is not None and ("
     "(i + 1) % check_every == 0 or last) and bool(all_done[:i + 1].any()):",
     "if eos is not None and ("
     "(i + 0) % check_every == 0 or last) and bool(all_done[:i + 1].any()):",
     "the checks at steps 0, 3, 6, ... (every step where the interval is 1): the output is cut where all_done "
     "says, exactly, whichever step the check runs at"),
    ("generation.py", "if s.top_p < 1.0:", "if s.top_p <= 1.0:",
     "top_p_filter at p = 1 drops only tokens whose ascending cumulative probability is <= 0, i.e. exactly 0: "
     "softmax gives them 0 either way, so the sampled distribution is the same bit for bit"),
    ("generation.py", "def check_sampling_args(max_new_tokens: Optional[int] = None, min_new_tokens: int = 0, "
     "do_sample: bool = False,", "def check_sampling_args(max_new_tokens: Optional[int] = None, min_new_tokens: "
     "int = 1, do_sample: bool = False,",
     "a validator's default: min_new_tokens 1 passes exactly where 0 does (max_new_tokens is >= 1 whenever it "
     "passes, and 1 when left to later)"),
    ("generation.py", "temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,",
     "temperature: float = 1.0, top_k: int = 1, top_p: float = 1.0,",
     "a validator's default: top_k 1 passes wherever 0 does"),
    ("losses.py", "@staticmethod", "",
     "torch calls an autograd Function's forward and backward through the class, ctx first: a plain function "
     "there is called the same way"),
    ("losses.py", "return F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.view(-1).to(logits.device))",
     "return F.cross_entropy(logits.float().view(-1, logits.size(1)), labels.view(-1).to(logits.device))",
     "a classifier's logits are always (batch, num_labels): dim 1 is the last"),
    ("data/text.py", "CHUNK_CHARS = 1 << 18", "CHUNK_CHARS = 1 << 19",
     "the size of the pieces tokenized in parallel: any size gives the same tokens "
     "(test_chunked_tokenization_equals_whole_text), only the batches' granularity changes"),
    ("data/text.py", "CHUNK_CHARS = 1 << 18", "CHUNK_CHARS = 2 << 18", "the same: a piece size"),
    ("data/text.py", "CHUNK_CHARS = 1 << 18", "CHUNK_CHARS = 1 << 17", "the same: a piece size"),
    ("data/text.py", "per_batch = 8  # pieces per encode_batch call: parallel work between progress-bar updates",
     "per_batch = 7  # pieces per encode_batch call: parallel work between progress-bar updates",
     "pieces per encode_batch call: the same tokens in batches of another size"),
    ("data/text.py", "per_batch = 8  # pieces per encode_batch call: parallel work between progress-bar updates",
     "per_batch = 9  # pieces per encode_batch call: parallel work between progress-bar updates", "the same"),
    ("losses.py", "if weight.size(0) > vocab_size:", "if weight.size(0) >= vocab_size:",
     "with exactly vocab_size rows, logits[:, vocab_size:] is empty: filling it is a no-op"),
    ("losses.py", "logp = torch.log_softmax(logits, dim=-1)", "logp = torch.log_softmax(logits, dim=1)",
     "a chunk's logits are (tokens, vocab): dim 1 is the last"),
    # parallel/tensor_parallel.py
    ("parallel/tensor_parallel.py",
     '"lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),',
     '"lm_head": ColwiseParallel(input_layouts=Shard(0), output_layouts=Replicate()),',
     "lm_head's input is ln_f's output, a DTensor (SequenceParallel keeps DTensors): ColwiseParallel takes a "
     "DTensor's own placement and reads the declared one only to compare it with Replicate, which Shard(0) fails "
     "as Shard(1) does (both redistribute to Replicate)"),
    ("parallel/tensor_parallel.py",
     '"lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),',
     '"lm_head": ColwiseParallel(input_layouts=Shard(2), output_layouts=Replicate()),', "the same as Shard(0)"),
    ("parallel/tensor_parallel.py",
     "return tuple(DTensor.from_local(t, mesh, [Replicate()], run_check=False)",
     "return tuple(DTensor.from_local(t, mesh, [Replicate()], run_check=True)",
     "run_check broadcasts rank 0's tensor over the replicas: every rank feeds these modules the same ids and "
     "activations, so it only costs a collective"),
    ("parallel/tensor_parallel.py", "module.c_attn.bias.copy_(module.c_attn.bias.index_select(0, idx))",
     "module.c_attn.bias.copy_(module.c_attn.bias.index_select(-1, idx))", "the bias is 1-D: dim -1 is dim 0"),
    ("parallel/tensor_parallel.py", '"attn": PrepareModuleInput(input_layouts=(Shard(1), None, None, None),',
     '"attn": PrepareModuleInput(input_layouts=(Shard(0), None, None, None),',
     "the block's input is ln_1's / ln_2's output, a DTensor (SequenceParallel): PrepareModuleInput keeps a "
     "DTensor's own placement and reads the declared one only to compare it with the desired Replicate"),
    ("parallel/tensor_parallel.py", '"attn": PrepareModuleInput(input_layouts=(Shard(1), None, None, None),',
     '"attn": PrepareModuleInput(input_layouts=(Shard(2), None, None, None),',
     "the block's input is ln_1's / ln_2's output, a DTensor (SequenceParallel): PrepareModuleInput keeps a "
     "DTensor's own placement and reads the declared one only to compare it with the desired Replicate"),
    ("parallel/tensor_parallel.py", '"mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),',
     '"mlp": PrepareModuleInput(input_layouts=(Shard(0),), desired_input_layouts=(Replicate(),)),',
     "the block's input is ln_1's / ln_2's output, a DTensor (SequenceParallel): PrepareModuleInput keeps a "
     "DTensor's own placement and reads the declared one only to compare it with the desired Replicate"),
    ("parallel/tensor_parallel.py", '"mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),',
     '"mlp": PrepareModuleInput(input_layouts=(Shard(2),), desired_input_layouts=(Replicate(),)),',
     "the block's input is ln_1's / ln_2's output, a DTensor (SequenceParallel): PrepareModuleInput keeps a "
     "DTensor's own placement and reads the declared one only to compare it with the desired Replicate"),
    # data/text.py, safe_dcp.py, safe_pickle.py (judged by i27c)
    ("data/text.py", 'cut = text.find("\\n", cut + 1)', 'cut = text.find("\\n", cut + 2)',
     "it skips only a '\\n' at cut + 1, which follows the '\\n' at cut, a whitespace: never a cut"),
    ("safe_pickle.py", "while stream.tell() < len(data):", "while stream.tell() <= len(data):",
     "at tell() == len(data) pickletools.genops raises at once ('pickle exhausted before seeing STOP'), which the "
     "one caller takes as None, what the loop's end returns"),
    # lora.py (judged by i27d)
    ("lora.py", 'names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}',
     'names = {name.rsplit(".", 2)[-1] for name, _ in model.named_modules()}',
     "the last piece of rsplit with any maxsplit >= 1 is the text after the last '.' (or the whole name)"),
    ("lora.py", 'return name.rsplit(".", 1)[-1] in targets', 'return name.rsplit(".", 2)[-1] in targets',
     "the same: the last piece of any rsplit with maxsplit >= 1"),
    ("lora.py", 'names = {name.rsplit(".", 1)[-1] for name, _ in peft_model.get_base_model().named_modules()}',
     'names = {name.rsplit(".", 2)[-1] for name, _ in peft_model.get_base_model().named_modules()}',
     "the same: the last piece of any rsplit with maxsplit >= 1"),
]


# ---------------------------------------------------------------------------------------------------------------
# The fork server and its client: the test command cosmic-ray runs for each mutant.

def serve(sock_path: str) -> None:
    """Import the slow libraries once, then fork a fresh pytest for each request (one at a time)."""
    import numpy, pytest, safetensors, torch, transformers  # noqa: F401  (what every test run would import)
    if os.path.exists(sock_path):
        os.unlink(sock_path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sock_path + ".tmp")
    os.rename(sock_path + ".tmp", sock_path)  # the socket appears only once it is ready
    server.listen(1)
    while True:
        conn, _ = server.accept()
        with conn:
            request = json.loads(_read_all(conn))
            if request.get("stop"):
                return
            code = _run_forked(conn, request)
            try:
                conn.sendall(f"\n{EXIT_MARK}{code}\n".encode())
            except OSError:
                pass  # the client was killed: nobody is listening


def _read_all(conn: socket.socket) -> bytes:
    chunks = []
    while chunk := conn.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _run_forked(conn: socket.socket, request: dict) -> int:
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            os.setsid()  # its own process group, so a timeout kills the subprocesses it started too
            # a mutant that loops appending to a list must not take the machine's memory before its timeout
            resource.setrlimit(resource.RLIMIT_DATA, (CHILD_MEMORY_BYTES, CHILD_MEMORY_BYTES))
            os.dup2(conn.fileno(), 1)
            os.dup2(conn.fileno(), 2)
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            sys.dont_write_bytecode = os.environ.get("PYTHONDONTWRITEBYTECODE") == "1"
            sys.path[0] = request["cwd"]  # as `python -m pytest` run there
            import pytest
            code = int(pytest.main(request["args"]))
        except BaseException:  # noqa: B036  (whatever happens, the child must not return into the server)
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    pidfd = os.pidfd_open(pid)
    ready, _, _ = select.select([pidfd], [], [], request["timeout"])
    if not ready:
        os.killpg(pid, signal.SIGKILL)
        try:
            conn.sendall(f"\n{TIMEOUT_MARK} after {request['timeout']:.0f} s\n".encode())
        except OSError:
            pass
    _, status = os.waitpid(pid, 0)
    os.close(pidfd)
    return 124 if not ready else os.waitstatus_to_exitcode(status)


def client(sock_path: str, timeout: float, pytest_args: list[str], selection_file: str | None = None) -> int:
    """Run pytest in the server: on the tests selection_file picks for the mutant now on disk, or on pytest_args."""
    if selection_file:
        tests = select_tests(selection_file)
        if not tests:
            print(NO_TESTS_MARK)
            return 0
        pytest_args = [*pytest_args, *tests]
        with open(selection_file) as f:
            durations = json.load(f).get("durations", {})
        if durations and all(t in durations for t in tests):
            # 3x what these tests took unmutated, with every fixture's setup (a shared fixture is set up by
            # whichever test comes first), not the whole mapping's time
            setups = json.load(open(selection_file)).get("setup_s", 0.0)
            timeout = min(timeout, 60 + 3 * (setups + sum(durations[t] for t in tests)))
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(sock_path)
    request = dict(args=pytest_args, cwd=os.getcwd(), env=dict(os.environ), timeout=timeout)
    conn.sendall(json.dumps(request).encode())
    conn.shutdown(socket.SHUT_WR)
    output = _read_all(conn).decode(errors="replace")
    body, _, code = output.rpartition(EXIT_MARK)
    sys.stdout.write(body)
    failed = re.search(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", body, re.M)
    if selection_file and failed:
        remember_killer(selection_file, failed.group(1))
    return int(code) if code.strip().lstrip("-").isdigit() else 3


def select_tests(selection_file: str) -> list[str]:
    """The tests to run against the mutant now on disk: those whose run executed a line the mutant changed (the
    whole statement it sits in), plus the tests that run the module in subprocesses, which coverage measured in
    the test process cannot see. A line run while the test modules were imported (a def, a default, a decorator,
    a module constant) takes every test. Order: the tests that killed the last mutants first (a test that kills
    one mutant often kills the next), then the fastest first."""
    import ast
    import difflib
    with open(selection_file) as f:
        sel = json.load(f)
    with open(sel["original"]) as f:
        original = f.read().splitlines()
    with open(sel["module_file"]) as f:
        mutated = f.read().splitlines()
    changed = set()
    for tag, i1, i2, _, _ in difflib.SequenceMatcher(a=original, b=mutated, autojunk=False).get_opcodes():
        if tag != "equal":
            changed.update(range(i1 + 1, max(i2, i1 + 1) + 1))
    lines = set(changed)
    tree = ast.parse("\n".join(original))
    bodies = [(n.body[0].lineno, n.end_lineno) for n in ast.walk(tree)
              if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    if not all(any(a <= n <= b for a, b in bodies) for n in changed):
        return order_tests(selection_file, sel, sel["order"])  # run at import (a def line, a default, a decorator, a constant)
    for node in ast.walk(tree):
        if isinstance(node, ast.stmt) and any(node.lineno <= n <= node.end_lineno for n in changed):
            body = getattr(node, "body", None)
            header_end = body[0].lineno - 1 if isinstance(body, list) and body else node.end_lineno
            if any(node.lineno <= n <= header_end for n in changed):  # the statement's own lines, not its body's
                lines.update(range(node.lineno, header_end + 1))
    chosen = set(sel["subprocess"])
    for line in lines:
        covering = sel["coverage"].get(str(line), [])
        chosen.update(sel["order"] if "" in covering else covering)
    return order_tests(selection_file, sel, chosen)


def order_tests(selection_file: str, sel: dict, chosen) -> list[str]:
    killers = []
    if os.path.exists(selection_file + ".killers"):
        with open(selection_file + ".killers") as f:
            killers = f.read().split("\n")
    rank = {t: i for i, t in enumerate(sel["order"])}
    return sorted(chosen, key=lambda t: (t not in killers, killers.index(t) if t in killers else rank.get(t, 0)))


def remember_killer(selection_file: str, test: str) -> None:
    killers = []
    if os.path.exists(selection_file + ".killers"):
        with open(selection_file + ".killers") as f:
            killers = f.read().split("\n")
    with open(selection_file + ".killers", "w") as f:
        f.write("\n".join([test, *[t for t in killers if t != test]]))


# ---------------------------------------------------------------------------------------------------------------
# One module's run: a scratch copy, a server, a baseline, cosmic-ray.

def slug(module: str) -> str:
    return module.replace("/", "_").removesuffix(".py")


def scratch_copy(dest: str) -> str:
    """The checkout's files as they are now (committed or not, ignored ones left out) in dest/repo, with dest/shared
    pointing at the shared data beside the checkout, as the tests expect it."""
    repo = os.path.join(dest, "repo")
    if os.path.isdir(repo):
        shutil.rmtree(repo)
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for path in filter(None, listed):
        source = os.path.join(REPO, path)
        if os.path.isfile(source):
            os.makedirs(os.path.dirname(os.path.join(repo, path)), exist_ok=True)
            shutil.copy2(source, os.path.join(repo, path))
    shared = os.path.join(os.path.dirname(REPO), "shared")
    if os.path.isdir(shared) and not os.path.islink(os.path.join(dest, "shared")):
        os.symlink(os.path.realpath(shared), os.path.join(dest, "shared"))
    return repo


def start_server(repo: str, sock_path: str, log_path: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=repo)
    if os.path.exists(sock_path):  # a stopped run's
        os.unlink(sock_path)
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, os.path.join(repo, "bench", "mutation.py"), "serve", sock_path],
                                  cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)
    while not os.path.exists(sock_path):  # the server renames its socket into place once it listens
        if server.poll() is not None:
            raise RuntimeError(f"the fork server stopped (exit {server.returncode}): see {log_path}")
        time.sleep(0.2)
    return server


def stop_server(server: subprocess.Popen, sock_path: str) -> None:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(sock_path)
            conn.sendall(json.dumps(dict(stop=True)).encode())
            conn.shutdown(socket.SHUT_WR)
        server.wait(timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        server.kill()
        server.wait()


def cosmic_ray_config(module: str, test_command: str, timeout: float) -> str:
    return "\n".join([
        "[cosmic-ray]",
        f'module-path = "gpt2_ascend/{module}"',
        f"timeout = {timeout:.0f}",
        "excluded-modules = []",
        f"test-command = {json.dumps(test_command)}",
        "[cosmic-ray.distributor]",
        'name = "local"',
        "[cosmic-ray.filters.operators-filter]",
        f"exclude-operators = [{json.dumps(f'core/(?!(?:{KEPT_OPERATORS})$)')}]",
        "",
    ])


def selection(module: str, repo: str, dest: str, pytest_output: str) -> dict:
    """What the client needs to pick each mutant's tests: the module as it was, each line's tests, the tests
    that run it in subprocesses, every test fastest first."""
    from coverage import CoverageData
    module_file = os.path.join(repo, "gpt2_ascend", module)
    original = os.path.join(dest, "original.py")
    shutil.copy2(module_file, original)
    order = tests_by_duration(pytest_output)
    data = CoverageData(os.path.join(dest, "coverage.sqlite"))
    data.read()
    measured = [f for f in data.measured_files() if os.path.realpath(f) == os.path.realpath(module_file)]
    by_line = data.contexts_by_lineno(measured[0]) if measured else {}
    coverage = {str(line): sorted({c.rpartition("|")[0] if "|" in c else c for c in contexts})
                for line, contexts in by_line.items()}
    subprocess_tests = [t for t in order if any(t.startswith(p) for p in SUBPROCESS_TESTS.get(module, ()))]
    return dict(module_file=module_file, original=original, order=order, coverage=coverage,
                subprocess=subprocess_tests, durations=test_durations(pytest_output),
                setup_s=sum(float(x) for x in re.findall(r"^([\d.]+)s setup\s", pytest_output, re.M)))


def carry_over_verdicts(old_session: str, new_session: str, module_file: str) -> None:
    """After a small edit of the module, the new run's mutants whose diff (the lines before and after, the n-th of
    its kind) equals one of the last run's keep that verdict; the others are pending."""
    import difflib
    from cosmic_ray.mutating import mutate_code
    from cosmic_ray.plugins import get_operator
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome

    def key_counts(pairs):
        seen: dict = {}
        for job, diff in pairs:
            key = changed_lines(diff)
            seen[key] = seen.get(key, 0) + 1
            yield job, (*key, seen[key])

    with use_db(old_session, WorkDB.Mode.open) as old:
        done = [(result, result.diff) for item, result in sorted(old.completed_work_items,
                                                                 key=lambda pair: pair[0].mutations[0].start_pos)
                if result.worker_outcome == WorkerOutcome.NORMAL]
    verdicts = {key: result for result, key in key_counts(done)}
    with open(module_file) as f:
        code = f.read()
    with use_db(new_session, WorkDB.Mode.open) as new:
        pairs = []
        for item in new.pending_work_items:
            spec = item.mutations[0]
            mutated = mutate_code(code, get_operator(spec.operator_name)(**spec.operator_args), spec.occurrence)
            diff = "\n".join(difflib.unified_diff(code.splitlines(), (mutated or code).splitlines(), lineterm=""))
            pairs.append(((item.job_id, spec.start_pos), diff))
        for (job_id, _), key in key_counts(sorted(pairs, key=lambda p: p[0][1])):
            if key in verdicts:
                new.set_result(job_id, verdicts[key])


def test_durations(pytest_output: str) -> dict[str, float]:
    """Seconds per test of pytest's --durations=0 report (setup, call and teardown added)."""
    total: dict[str, float] = {}
    for seconds, node in re.findall(r"^([\d.]+)s (?:setup|call|teardown)\s+(\S.*)$", pytest_output, re.M):
        total[node] = total.get(node, 0.0) + float(seconds)
    return total


def tests_by_duration(pytest_output: str) -> list[str]:
    """The node ids of pytest's --durations=0 report, the fastest test first."""
    total = test_durations(pytest_output)
    return sorted(total, key=total.get)


def file_sha256(path: str) -> str:
    import hashlib
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def run_module(module: str, workdir: str, rerun_survivors: bool = False, resume: bool = False) -> dict:
    """Mutate one module and run its tests against each mutant. resume: only the mutants a stopped run left
    pending; rerun_survivors: also the last run's survivors (against the tests as they are now: after a test was
    added for them). Both keep every verdict already reached, so the module must not have changed."""
    dest = os.path.join(workdir, slug(module))
    session = os.path.join(dest, "session.sqlite")
    module_sha = file_sha256(os.path.join(REPO, "gpt2_ascend", module))
    previous, changed = {}, False
    if resume or rerun_survivors:
        if os.path.exists(os.path.join(dest, "summary.json")):
            with open(os.path.join(dest, "summary.json")) as f:
                previous = json.load(f)
        changed = file_sha256(os.path.join(dest, "original.py")) != module_sha
        if changed:  # mutants are matched to the last run's by their diff below
            os.replace(session, session + ".before")
    elif os.path.isdir(dest):
        shutil.rmtree(dest)
    os.makedirs(dest, exist_ok=True)
    repo = scratch_copy(dest)
    sock_path = os.path.join(dest, "server.sock")
    server = start_server(repo, sock_path, os.path.join(dest, "server.log"))
    try:
        client_cmd = [sys.executable, os.path.join(repo, "bench", "mutation.py"), "client", sock_path]
        # the unmutated code first: it must pass; it also records which test runs which line of the module (coverage
        # per test) and how long each test takes, and its total sets the mutants' timeout
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # compile the .pyc once
        env["COVERAGE_FILE"] = os.path.join(dest, "coverage.sqlite")
        started = time.monotonic()
        baseline = subprocess.run([*client_cmd, "--timeout", "7200", "--", *PYTEST, "--durations=0",
                                   "--durations-min=0", f"--cov=gpt2_ascend/{os.path.dirname(module) or '.'}",
                                   "--cov-context=test", "--cov-report=", *MODULES[module]], cwd=repo, env=env,
                                  capture_output=True, text=True)
        baseline_s = time.monotonic() - started
        if baseline.returncode != 0:
            raise RuntimeError(f"{module}: the tests fail on the unmutated code:\n{baseline.stdout[-3000:]}")
        selection_file = os.path.join(dest, "selection.json")
        with open(selection_file, "w") as f:
            json.dump(selection(module, repo, dest, baseline.stdout), f)
        # the baseline compiled the modules' .pyc; the mutated module's must go, and mutants write none
        cache = os.path.join(repo, "gpt2_ascend", os.path.dirname(module), "__pycache__")
        for name in os.listdir(cache) if os.path.isdir(cache) else []:
            if name.startswith(os.path.basename(module).removesuffix(".py") + "."):
                os.unlink(os.path.join(cache, name))
        timeout = max(120.0, 3 * baseline_s)
        test_command = shlex.join([*client_cmd, "--timeout", f"{timeout:.0f}", "--select", selection_file, "--",
                                   *PYTEST, "-p", "no:cov"])
        config = os.path.join(dest, "cosmic-ray.toml")
        with open(config, "w") as f:
            f.write(cosmic_ray_config(module, test_command, timeout + 60))
        bindir = os.path.dirname(sys.executable)
        fresh = not (resume or rerun_survivors) or changed
        if fresh:
            subprocess.run([os.path.join(bindir, "cosmic-ray"), "init", config, session], cwd=repo, check=True)
            subprocess.run([os.path.join(bindir, "cr-filter-operators"), session, config], cwd=repo, check=True)
        if fresh and (resume or rerun_survivors):
            carry_over_verdicts(session + ".before", session, os.path.join(repo, "gpt2_ascend", module))
        if rerun_survivors:  # a mutant without a result is pending: exec runs those only
            with sqlite3.connect(session) as db:
                db.execute("DELETE FROM work_results WHERE test_outcome = 'SURVIVED'")
        started = time.monotonic()
        subprocess.run([os.path.join(bindir, "cosmic-ray"), "exec", config, session], cwd=repo, check=True)
        elapsed = round(time.monotonic() - started)
        summary = dict(module=module, module_sha256=module_sha, baseline_s=round(baseline_s, 1),
                       run_s=previous.get("run_s", 0) + (0 if rerun_survivors else elapsed),
                       rerun_s=previous.get("rerun_s", 0) + (elapsed if rerun_survivors else 0),
                       load=round(os.getloadavg()[0], 1))
        with open(os.path.join(dest, "summary.json"), "w") as f:
            json.dump(summary, f)
    finally:
        stop_server(server, sock_path)
    return summary


# ---------------------------------------------------------------------------------------------------------------
# Scores.

def changed_lines(diff: str) -> tuple[str, str]:
    """The mutant's diff as (the lines before, the lines after), stripped."""
    lines = diff.splitlines()
    before = [line[1:].strip() for line in lines if line.startswith("-") and not line.startswith("---")]
    after = [line[1:].strip() for line in lines if line.startswith("+") and not line.startswith("+++")]
    before, after = [b for b in before if b], [a for a in after if a]  # a removed decorator takes a blank line
    return " / ".join(before), " / ".join(after)


ANNOTATION = "inside a type annotation, which `from __future__ import annotations` keeps as a string nothing evaluates"


def in_annotation(source_file: str, line: int, col: int) -> bool:
    """Whether (line, col) of the module lies in a type annotation."""
    import ast
    with open(source_file) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        annotations = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            annotations = [node.returns, *[arg.annotation for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs,
                                                                     a.vararg, a.kwarg] if arg is not None]]
        elif isinstance(node, ast.AnnAssign):
            annotations = [node.annotation]
        for ann in filter(None, annotations):
            if (ann.lineno, ann.col_offset) <= (line, col) < (ann.end_lineno, ann.end_col_offset):
                return True
    return False


def equivalence_reason(module: str, before: str, after: str) -> str | None:
    squeeze = lambda text: re.sub(r"\s+", "", text)  # noqa: E731  (cosmic-ray writes `x[ -1]`, `( 2 << 20)`)
    for mod, old, new, reason in EQUIVALENT:
        if mod == module and squeeze(old) == squeeze(before) and squeeze(new) == squeeze(after):
            return reason
    return None


def score(module: str, workdir: str) -> dict | None:
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome
    dest = os.path.join(workdir, slug(module))
    session = os.path.join(dest, "session.sqlite")
    if not os.path.exists(session):
        return None
    summary = dict(baseline_s=0, run_s=0, rerun_s=0)  # a run still going: its counts so far
    if os.path.exists(os.path.join(dest, "summary.json")):
        with open(os.path.join(dest, "summary.json")) as f:
            summary = json.load(f)
    counts = dict(summary, killed=0, timeout=0, survived=0, equivalent=0, incompetent=0, pending=0)
    survivors, equivalents = [], []
    with use_db(session, WorkDB.Mode.open) as db:
        counts["pending"] = sum(1 for _ in db.pending_work_items)
        for item, result in db.completed_work_items:
            if result.worker_outcome == WorkerOutcome.SKIPPED:
                continue
            op = item.mutations[0].operator_name.removeprefix("core/")
            if result.worker_outcome != WorkerOutcome.NORMAL or result.test_outcome == TestOutcome.INCOMPETENT:
                counts["incompetent"] += 1
            elif result.test_outcome == TestOutcome.KILLED:
                output = result.output or ""
                if TIMEOUT_MARK in output:
                    counts["timeout"] += 1
                elif re.search(r"^(FAILED|ERROR) ", output, re.M) or re.search(r"\d+ (failed|error)", output):
                    counts["killed"] += 1
                else:  # the client or pytest itself broke (a collection error counts here too)
                    counts["incompetent"] += 1
            else:
                before, after = changed_lines(result.diff or "")
                line, col = item.mutations[0].start_pos
                reason = equivalence_reason(module, before, after)
                original = os.path.join(dest, "original.py")
                if reason is None and os.path.exists(original) and in_annotation(original, line, col):
                    reason = ANNOTATION
                counts["equivalent" if reason else "survived"] += 1
                (equivalents if reason else survivors).append((line, op, before, after, reason))
    counts["survivors"] = sorted(survivors)
    counts["equivalents"] = sorted(equivalents)
    return counts


def report(modules: list[str], workdir: str) -> None:
    rows = [(m, score(m, workdir)) for m in modules]
    print("| module | mutants | killed | timeout | survived | equivalent | score | baseline tests | run |")
    print("|---|---|---|---|---|---|---|---|---|")
    for module, c in rows:
        if c is None:
            print(f"| `{module}` | not run | | | | | | | |")
            continue
        total = c["killed"] + c["timeout"] + c["survived"] + c["equivalent"]
        judged = total - c["equivalent"]
        mutation_score = (c["killed"] + c["timeout"]) / judged if judged else 1.0
        print(f"| `{module}` | {total} | {c['killed']} | {c['timeout']} | {c['survived']} | {c['equivalent']} | "
              f"{100 * mutation_score:.1f}% | {c['baseline_s']:.0f} s | {c['run_s'] / 60:.0f} min |"
              + (f" ({c['incompetent']} incompetent)" if c["incompetent"] else "")
              + (f" ({c['pending']} pending)" if c["pending"] else ""))
    for module, c in rows:
        for line, op, before, after, _ in (c or {}).get("survivors", []):
            print(f"SURVIVED {module}:{line} [{op}] {before}  ->  {after}")
    for module, c in rows:
        for line, op, before, after, reason in (c or {}).get("equivalents", []):
            print(f"EQUIVALENT {module}:{line} [{op}] {before}  ->  {after}: {reason}")


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["serve"]:
        serve(argv[1])
        return 0
    if argv[:1] == ["client"]:
        try:
            return run_client(argv)
        except Exception:  # noqa: BLE001 - printed where cosmic-ray keeps the output: a tool error, not a kill
            print(f"{CLIENT_ERROR_MARK}\n{traceback.format_exc()}")
            return 3
    return run_campaign(argv)


def run_client(argv: list[str]) -> int:
    split = argv.index("--")
    selection_file = argv[argv.index("--select") + 1] if "--select" in argv[:split] else None
    return client(argv[1], float(argv[argv.index("--timeout") + 1]), argv[split + 1:], selection_file)


def run_campaign(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", help=f"paths under gpt2_ascend/ (default: all): {', '.join(MODULES)}")
    parser.add_argument("--workdir", default=DEFAULT_WORKDIR, help="scratch copies and results (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=1, help="modules run at the same time (default: 1)")
    parser.add_argument("--report", action="store_true", help="print the last run's scores only")
    parser.add_argument("--resume", action="store_true", help="go on with a stopped run's pending mutants")
    parser.add_argument("--rerun-survivors", action="store_true",
                        help="run the last run's survivors again, against the tests as they are now")
    args = parser.parse_args(argv)
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        print(f"error: unknown module {unknown[0]!r}: choose from {', '.join(MODULES)}", file=sys.stderr)
        return 2
    modules = args.modules or list(MODULES)
    if shutil.which("cosmic-ray", path=os.path.dirname(sys.executable)) is None and not args.report:
        print("error: cosmic-ray is not installed: pip install -r requirements/mutation.txt", file=sys.stderr)
        return 2
    if not args.report:
        os.makedirs(args.workdir, exist_ok=True)
        def one(module):
            try:
                print(f"done: {run_module(module, args.workdir, args.rerun_survivors, args.resume)}", flush=True)
            except Exception as e:  # noqa: BLE001 - one module's failure must not stop the others
                print(f"failed: {module}: {e}", flush=True)
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(one, modules))
    report(modules, args.workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
