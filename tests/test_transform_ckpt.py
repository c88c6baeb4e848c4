"""MindFormers' distributed checkpoints without MindSpore (issue 25): transform_ckpt's merge and its cut for another
layout, the folder loaded directly by every command, bad input in one line.

Oracles: MindSpore's own merges and cuts -- ../shared/mindspore_distributed/ (its README) and
tests/fixtures/mindspore_distributed/ (made with MindSpore 2.10 by fixtures/make_mindspore_distributed.py: dims cut
over two device axes, size-1 and repeated axes, uneven param_split_shape, adam states, MindFormers' GPT-2 pipeline
layout, destination layouts) -- the unsliced tensors, the layouts' definitions written out here, and MindFormers'
reference run (../shared/mindformers_reference)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, load_script
from helpers.faults import assert_one_error, digest
from gpt2_ascend.convert import transform_ckpt
from gpt2_ascend.loading import load_model
from gpt2_ascend.mindspore_io.ckpt import read_ckpt, write_ckpt
from gpt2_ascend.mindspore_io.distributed import DistributedCheckpoint
from gpt2_ascend.mindspore_io.proto import proto_messages
from gpt2_ascend.mindspore_io.strategy import Layout, StrategyError, read_strategy

SHARED = os.path.join(os.path.dirname(REPO), "shared", "mindspore_distributed", "fixtures")
REFERENCE = os.path.join(os.path.dirname(REPO), "shared", "mindformers_reference")
OURS = os.path.join(REPO, "tests", "fixtures", "mindspore_distributed")
needs_shared = pytest.mark.skipif(not os.path.isdir(SHARED), reason=f"the shared MindSpore fixtures are not at {SHARED}")

# (case folder, MindSpore's merged file in it, the unsliced tensors)
MERGES = {
    "case_mp2": (f"{SHARED}/case_mp2", "transformed/rank_0/merged0.ckpt", "full.npz"),
    "case_pp2dp2mp2": (f"{SHARED}/case_pp2dp2mp2", "transformed/rank_0/merged0.ckpt", "full.npz"),
    "gpt2_dp1_mp2_pp2": (f"{SHARED}/gpt2_dp1_mp2_pp2", "target/rank_0/gpt20.ckpt", f"{REFERENCE}/init.ckpt"),
    "axes": (f"{OURS}/axes", "transformed/rank_0/merged0.ckpt", "full.ckpt"),
    "pp2_adam": (f"{OURS}/pp2_adam", "transformed/rank_0/merged0.ckpt", "full.ckpt"),
    "gpt2_pipeline": (f"{OURS}/gpt2_pipeline", "transformed/rank_0/merged0.ckpt", "full.ckpt"),
}
SHARED_CASES = ("case_mp2", "case_pp2dp2mp2", "gpt2_dp1_mp2_pp2")


def case_param(name):
    return pytest.param(name, marks=needs_shared) if name in SHARED_CASES else name


def unsliced(case) -> dict:
    folder, _, full = MERGES[case]
    path = os.path.join(folder, full)
    if path.endswith(".npz"):
        return {k: torch.from_numpy(v) for k, v in np.load(path).items()}
    return read_ckpt(path)


def transform_cli(*args) -> int:
    return load_script("convert/transform_ckpt.py").main([str(a) for a in args])


def assert_same_tensors(got: dict, want: dict):
    assert set(got) == set(want), set(got) ^ set(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype and torch.equal(got[name], value), name


# ---------------------------------------------------------------------------------------------------------------
# the merge: MindSpore's file, byte for byte
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [case_param(c) for c in MERGES])
def test_merge_writes_mindspores_file_byte_for_byte(case, tmp_path, capsys):
    folder, merged, _ = MERGES[case]
    assert transform_cli("--src_ckpt_strategy", f"{folder}/strategy/", "--src_ckpt_dir", f"{folder}/checkpoint/",
                         "--dst_ckpt_dir", tmp_path / "target", "--prefix", "gpt2", "--no_crc") == 0
    assert os.listdir(tmp_path / "target") == ["rank_0"] and os.listdir(tmp_path / "target" / "rank_0") == ["gpt20.ckpt"]
    with open(tmp_path / "target" / "rank_0" / "gpt20.ckpt", "rb") as ours, open(f"{folder}/{merged}", "rb") as ms:
        assert ours.read() == ms.read()
    # with the crc trailer (the default): the same tensors, and the crc verifies
    assert transform_cli("--src_ckpt_strategy", f"{folder}/strategy/", "--src_ckpt_dir", f"{folder}/checkpoint/",
                         "--dst_ckpt_dir", tmp_path / "crc", "--prefix", "gpt2") == 0
    got = read_ckpt(tmp_path / "crc" / "rank_0" / "gpt20.ckpt", verify_crc=True)
    full = unsliced(case)
    for name, value in full.items():  # every parameter at its full shape, as it was before it was sliced
        assert got[name].dtype == value.dtype and torch.equal(got[name], value), name
    assert "merged from their slices" in capsys.readouterr().out


def test_uneven_param_split_shape_merges_as_mindsporess_merge_sliced_parameter():
    folder = f"{OURS}/uneven"
    with DistributedCheckpoint(f"{folder}/checkpoint", f"{folder}/strategy") as ckpt:
        merged = {name: ckpt.load(name) for name in ckpt.entries}
    want = read_ckpt(f"{folder}/merged_sliced.ckpt")  # MindSpore's merge_sliced_parameter
    assert_same_tensors(merged, want)
    assert_same_tensors(merged, read_ckpt(f"{folder}/full.ckpt"))
    assert merged["emb"].shape == (10, 6) and merged["table"].shape == (9, 4)  # rows 6 + 4 and 5 + 4


def test_layout_fields_mean_what_the_readme_says():
    """Each field's definition, written out: dev_matrix row-major, tensor_map counted from the right, the optimizer
    shard (local // step) % size along dim 0, a dim cut over two axes (the first the major one), size-1 axes."""
    layout = Layout("w", 0, (2, 2), ((0,), ()), opt_step=2, opt_size=2)  # [dp, mp]; dim 0 by mp, sharded over dp
    assert [layout.block(r) for r in range(4)] == [(0, 0), (1, 0), (0, 0), (1, 0)]
    assert [layout.opt_chunk(r) for r in range(4)] == [0, 0, 1, 1]
    assert [layout.region(r, (16, 8))[0] for r in range(4)] == [slice(0, 4), slice(8, 12), slice(4, 8), slice(12, 16)]
    assert layout.full_shape((4, 8)) == (16, 8)
    two_axes = Layout("w", 0, (2, 1, 2), ((2, 0), ()))  # dim 0 over the first and the last axis, a size-1 between
    assert [two_axes.block(r)[0] for r in range(4)] == [0, 1, 2, 3] and two_axes.splits == (4, 1)
    transposed = Layout("w", 0, (2, 1, 2), ((0,), (2,)))
    assert [transposed.block(r) for r in range(4)] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    uneven = Layout("w", 0, (2, 2), ((1,), (0,)), split_shape=(6, 6, 4, 4))
    assert uneven.region(3, (10, 6)) == (slice(6, 10), slice(3, 6)) and uneven.full_shape((6, 3)) == (10, 6)


# ---------------------------------------------------------------------------------------------------------------
# the cut for another layout: MindSpore's files, byte for byte; and round trips
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case,source", [("pp2_adam", "distributed"), ("gpt2_pipeline", "unsliced")])
def test_cut_for_a_destination_layout_writes_mindspores_files(case, source, tmp_path):
    folder = f"{OURS}/{case}"
    src = ["--src_ckpt_strategy", f"{folder}/strategy", "--src_ckpt_dir", f"{folder}/checkpoint"] \
        if source == "distributed" else ["--src_ckpt_dir", f"{folder}/full.ckpt"]
    assert transform_cli(*src, "--dst_ckpt_strategy", f"{folder}/dst_strategy", "--dst_ckpt_dir", tmp_path / "out",
                         "--prefix", "sliced", "--no_crc") == 0
    ranks = sorted(os.listdir(f"{folder}/dst_transformed"))
    assert sorted(os.listdir(tmp_path / "out")) == ranks == [f"rank_{r}" for r in range(4)]
    for r in range(4):
        with open(tmp_path / "out" / f"rank_{r}" / f"sliced{r}.ckpt", "rb") as ours, \
                open(f"{folder}/dst_transformed/rank_{r}/sliced{r}.ckpt", "rb") as ms:
            assert ours.read() == ms.read(), r


@pytest.mark.parametrize("case", [case_param(c) for c in MERGES] + ["uneven"])
def test_cut_with_the_source_strategy_gives_back_every_rank_file(case, tmp_path):
    """slice(merge(x)) == x: the merged checkpoint cut with the run's own strategy is, rank by rank, the files the
    run wrote (same names, values, dtypes); and merge(slice(full)) == full."""
    folder = MERGES[case][0] if case in MERGES else f"{OURS}/{case}"
    transform_ckpt(f"{folder}/strategy", f"{folder}/checkpoint", tmp_path / "merged", "m")
    transform_ckpt(None, tmp_path / "merged" / "rank_0" / "m0.ckpt", tmp_path / "cut", "c",
                   dst_ckpt_strategy=f"{folder}/strategy")
    from gpt2_ascend.mindspore_io.distributed import rank_files
    originals = rank_files(f"{folder}/checkpoint")
    assert sorted(os.listdir(tmp_path / "cut")) == sorted(f"rank_{r}" for r in originals)
    for rank, path in originals.items():
        assert_same_tensors(read_ckpt(tmp_path / "cut" / f"rank_{rank}" / f"c{rank}.ckpt"), read_ckpt(path))
    transform_ckpt(f"{folder}/strategy", tmp_path / "cut", tmp_path / "again", "a")
    assert_same_tensors(read_ckpt(tmp_path / "again" / "rank_0" / "a0.ckpt"), read_ckpt(tmp_path / "merged/rank_0/m0.ckpt"))


# ---------------------------------------------------------------------------------------------------------------
# negative controls: the merge reads each slice from the rank that holds it
# ---------------------------------------------------------------------------------------------------------------
@needs_shared
@pytest.mark.parametrize("a,b,changed", [
    # case_pp2dp2mp2: stage 0 = ranks 0-3, stage 1 = ranks 4-7, local rank = dp * 2 + mp. Ranks 0 and 1 hold other mp
    # blocks of the embedding and layer0; 0 and 2 other optimizer chunks of them; 4 and 6 other chunks of layer1
    # (step 2) and head.bias (step 1, size 4), but the same chunk of final_ln.beta (step 1, size 2: 4 % 2 == 6 % 2)
    # and the same replicated final_ln.gamma
    (0, 1, {"embedding.weight", "layer0.dense.weight"}),
    (0, 2, {"embedding.weight", "layer0.dense.weight"}),
    (4, 6, {"layer1.dense.weight", "head.bias"}),
])
def test_swapping_two_rank_files_changes_exactly_the_tensors_they_hold(a, b, changed, tmp_path):
    case = f"{SHARED}/case_pp2dp2mp2"
    shutil.copytree(f"{case}/checkpoint", tmp_path / "checkpoint")
    pa, pb = tmp_path / "checkpoint" / f"rank_{a}" / "net.ckpt", tmp_path / "checkpoint" / f"rank_{b}" / "net.ckpt"
    pa.rename(tmp_path / "x")
    pb.rename(pa)
    (tmp_path / "x").rename(pb)
    with DistributedCheckpoint(str(tmp_path / "checkpoint"), f"{case}/strategy") as ckpt:
        got = {name: ckpt.load(name) for name in ckpt.entries}
    full = unsliced("case_pp2dp2mp2")
    assert {name for name in full if not torch.equal(got[name], full[name])} == changed


# ---------------------------------------------------------------------------------------------------------------
# loaded directly: load_model and every command
# ---------------------------------------------------------------------------------------------------------------
def logits(model, vocab, seed=0):
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


@needs_shared
def test_load_model_reads_the_run_folder_as_the_unsliced_checkpoint():
    folder = f"{SHARED}/gpt2_dp1_mp2_pp2"  # checkpoint/ and strategy/ inside, as MindFormers' output/
    want = load_model(f"{REFERENCE}/init.ckpt", overrides=dict(n_head=4))
    for model in (load_model(folder, overrides=dict(n_head=4)),
                  load_model(f"{folder}/checkpoint", strategy=f"{folder}/strategy", overrides=dict(n_head=4))):
        assert torch.equal(logits(model, 1000), logits(want, 1000))
        assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), want.state_dict().values()))


def test_load_model_reads_mindformers_pipeline_layout_with_optimizer_states():
    folder = f"{OURS}/gpt2_pipeline"  # the head's copy of the embedding cut by mp, adam_m / adam_v beside
    model = load_model(f"{folder}/checkpoint", strategy=f"{folder}/strategy", overrides=dict(n_head=2))
    want = load_model(f"{folder}/full.ckpt", overrides=dict(n_head=2))
    assert model.config.n_layer == 2 and model.config.n_embd == 16 and model.config.vocab_size == 64
    assert torch.equal(logits(model, 64), logits(want, 64))


@needs_shared
def test_mindspore_to_hf_converts_the_run_folder(tmp_path, capsys):
    folder, to_hf = f"{SHARED}/gpt2_dp1_mp2_pp2", load_script("convert/mindspore_to_hf.py").main
    assert to_hf(["--mindspore_path", folder, "--output_dir", str(tmp_path / "a"), "--n_head", "4"]) == 0
    assert "skipped 1: 1 bookkeeping entries (global_step)" in capsys.readouterr().out
    assert to_hf(["--mindspore_path", f"{folder}/checkpoint", "--src_strategy_path_or_dir", f"{folder}/strategy",
                  "--output_dir", str(tmp_path / "b"), "--n_head", "4"]) == 0
    assert to_hf(["--mindspore_path", f"{REFERENCE}/init.ckpt", "--output_dir", str(tmp_path / "c"), "--n_head", "4"]) == 0
    weights = [(tmp_path / d / "model.safetensors").read_bytes() for d in "abc"]
    assert weights[0] == weights[1] == weights[2]


@needs_shared
def test_evaluate_and_generate_read_the_run_folder(tmp_path, capsys):
    folder, evaluate = f"{SHARED}/gpt2_dp1_mp2_pp2", load_script("evaluate.py").main
    np.save(tmp_path / "valid.npy", np.load(f"{REFERENCE}/batch.npy").astype(np.uint16)[:, :32])
    results = []
    for model in ([folder], [f"{folder}/checkpoint", "--src_strategy_path_or_dir", f"{folder}/strategy"],
                  [f"{REFERENCE}/init.ckpt"]):
        assert evaluate(["--model", *model, "--n_head", "4", "--eval_dataset_dir", str(tmp_path / "valid.npy"),
                         "--seq_length", "32", "--no_progress"]) == 0
        results.append(json.loads(capsys.readouterr().out.splitlines()[-1]))
    assert results[0]["loss"] == results[1]["loss"] == results[2]["loss"] > 6  # ~ln(1000) at init
    generate = load_script("generate.py").main
    texts = []
    for model in ([folder], [f"{REFERENCE}/init.ckpt"]):  # '!#%' and every id < 94 is inside the 1000-token vocab
        assert generate(["--model", *model, "--n_head", "4", "--prompt", "!#%", "--max_new_tokens", "6"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].startswith("!#%")


@needs_shared
@pytest.mark.parametrize("form", ["output_folder", "two_flags"])
def test_train_from_the_run_folder_reproduces_mindformers_own_run(form, tmp_path, capsys):
    """train.py --load_checkpoint output/ (or output/checkpoint + --src_strategy_path_or_dir) starts from the merged
    weights: the 5 losses of MindFormers' own run of these weights (../shared/mindformers_reference)."""
    from test_mindformers_reference import TOL, mindformers_recipe
    folder = f"{SHARED}/gpt2_dp1_mp2_pp2"
    recipe = mindformers_recipe(tmp_path, "constant")
    recipe.pop("load_checkpoint")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    load = ["--load_checkpoint", folder] if form == "output_folder" else \
        ["--load_checkpoint", f"{folder}/checkpoint", "--src_strategy_path_or_dir", f"{folder}/strategy"]
    assert load_script("train.py").main(["--config", str(tmp_path / "r.yaml"), *load,
                                         "--output_dir", str(tmp_path / "run")]) == 0
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    with open(f"{REFERENCE}/losses.json") as f:
        want = json.load(f)["train_losses"]["pynative/fp32/gelu/FusedAdamWeightDecay/constant"]
    assert len(losses) == 5 and max(abs(a - b) for a, b in zip(losses, want)) <= TOL


# ---------------------------------------------------------------------------------------------------------------
# bad input: exit 2, one line naming the rank / file / parameter, nothing written
# ---------------------------------------------------------------------------------------------------------------
def strategy_message(path):
    message = proto_messages("node_strategy.proto")["ParallelStrategyMap"]()
    with open(path, "rb") as f:
        message.ParseFromString(f.read())
    return message


def edit_strategies(folder, edit, ranks=range(8)):
    """Apply edit(ParallelLayouts by name) to the strategy files of `ranks`."""
    for r in ranks:
        path = folder / "strategy" / f"ckpt_strategy_rank_{r}.ckpt"
        message = strategy_message(path)
        edit({item.param_name: item.parallel_layouts for item in message.parallel_layout_item}, message)
        path.write_bytes(message.SerializeToString())


def remove_layout(name):
    def edit(layouts, message):
        kept = [item for item in message.parallel_layout_item if item.param_name != name]
        del message.parallel_layout_item[:]
        message.parallel_layout_item.extend(kept)
    return edit


def set_field(name, field, value):
    def edit(layouts, message):
        for key, target in layouts.items():
            if key.endswith(name):  # "name", or "<stage>-name" in a merged file
                if field in ("tensor_map", "dev_matrix", "param_split_shape"):
                    del getattr(target, field)[0].dim[:]
                    getattr(target, field)[0].dim.extend(value)
                else:
                    setattr(target, field, value)
    return edit


def retype(path, name, dtype):
    """Rewrite a rank file with one tensor in another dtype."""
    tensors = read_ckpt(path)
    tensors[name] = tensors[name].to(dtype)
    write_ckpt(path, tensors)


def truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep])


PP, UNEVEN, GPT2 = f"{SHARED}/case_pp2dp2mp2", f"{OURS}/uneven", f"{SHARED}/gpt2_dp1_mp2_pp2"
BAD = {  # name: (the case a copy is made of, what is done to the copy, fragments of the one error line)
    "missing_rank_file": (PP, lambda c: (c / "checkpoint/rank_5/net.ckpt").unlink(), ["rank 5", "missing"]),
    "missing_rank_folder": (PP, lambda c: shutil.rmtree(c / "checkpoint/rank_7"), ["rank 7 is missing", "8 ranks"]),
    "extra_rank": (PP, lambda c: shutil.copytree(c / "checkpoint/rank_7", c / "checkpoint/rank_8"),
                   ["9 ranks", "describes 8"]),
    "truncated_rank_file": (PP, lambda c: truncate(c / "checkpoint/rank_3/net.ckpt", 100),
                            ["rank 3", "rank_3/net.ckpt", "truncated or corrupt"]),
    "garbage_rank_file": (PP, lambda c: (c / "checkpoint/rank_6/net.ckpt").write_bytes(b"\xff" * 64),
                          ["rank 6", "rank_6/net.ckpt"]),
    "strategy_of_another_run": (PP, lambda c: [p.unlink() for p in (c / "strategy").glob("*_rank_[4-7].ckpt")],
                                ["8 ranks", "describes 4"]),
    "strategy_not_a_strategy": (PP, lambda c: (c / "strategy/ckpt_strategy_rank_2.ckpt").write_bytes(b"\x08\x01junk"),
                                ["ckpt_strategy_rank_2.ckpt", "not a MindSpore strategy file"]),
    "a_checkpoint_as_strategy": (PP, lambda c: shutil.copy(c / "checkpoint/rank_0/net.ckpt",
                                                           c / "strategy/ckpt_strategy_rank_0.ckpt"),
                                 ["ckpt_strategy_rank_0.ckpt", "not a MindSpore strategy file"]),
    "a_parameter_missing_from_the_strategy": (PP, lambda c: edit_strategies(c, remove_layout("head.bias"), range(4, 8)),
                                              ["'head.bias' is not in the strategy", "different values"]),
    "ranks_of_a_stage_disagree": (PP, lambda c: edit_strategies(c, set_field("layer1.dense.weight",
                                                                             "opt_weight_shard_size", 0), [4]),
                                  ["stage 1", "disagree"]),
    "tensor_map_of_another_rank": (PP, lambda c: edit_strategies(c, set_field("layer0.dense.weight", "tensor_map", [0])),
                                   ["layer0.dense.weight", "tensor_map has 1"]),
    "axis_outside_dev_matrix": (PP, lambda c: edit_strategies(c, set_field("embedding.weight", "tensor_map", [5, -1])),
                                ["embedding.weight", "tensor_map", "outside dev_matrix"]),
    "axis_twice": (PP, lambda c: edit_strategies(c, set_field("embedding.weight", "tensor_map", [0, 0])),
                   ["embedding.weight", "tensor_map", "same device axis"]),
    "field_split": (PP, lambda c: edit_strategies(c, set_field("head.bias", "field", 39)), ["head.bias", "field 39"]),
    "opt_step_zero": (PP, lambda c: edit_strategies(c, set_field("head.bias", "opt_weight_shard_step", 0)),
                      ["head.bias", "opt_weight_shard_step 0"]),
    "slice_of_another_dtype": (PP, lambda c: retype(c / "checkpoint/rank_1/net.ckpt", "embedding.weight", torch.float16),
                               ["rank 1", "'embedding.weight'", "Float16"]),
    "slices_of_another_shape": (UNEVEN, lambda c: edit_strategies(c, set_field("emb", "param_split_shape", [5] * 4),
                                                                  range(4)),
                                ["rank 0 holds 'emb' as Float32 [6, 3]", "[5, 3] slice"]),
    "stages_disagree_on_a_shared_tensor": (GPT2, lambda c: edit_strategies(
        c, set_field("word_embedding.embedding_table", "opt_weight_shard_size", 0), [2, 3]),
        ["rank 2", "word_embedding", "[1000, 64] slice"]),
}


@pytest.mark.parametrize("name", [pytest.param(n, marks=needs_shared) if BAD[n][0] != UNEVEN else n for n in BAD])
def test_bad_input_is_one_line_and_writes_nothing(name, tmp_path, capsys):
    source, damage, fragments = BAD[name]
    case = tmp_path / "case"
    shutil.copytree(source, case, ignore=shutil.ignore_patterns("transformed", "target", "merged*", "dst_*"))
    damage(case)
    before = digest(tmp_path)
    assert transform_cli("--src_ckpt_strategy", case / "strategy", "--src_ckpt_dir", case / "checkpoint",
                         "--dst_ckpt_dir", tmp_path / "out", "--prefix", "gpt2") == 2
    assert_one_error(capsys.readouterr().err, *fragments)
    assert digest(tmp_path) == before  # no output folder, no temporary, nothing changed


@needs_shared
def test_bad_destination_and_output_folders_are_one_line(tmp_path, capsys):
    case = f"{SHARED}/case_pp2dp2mp2"
    src = ["--src_ckpt_strategy", f"{case}/strategy", "--src_ckpt_dir", f"{case}/checkpoint"]
    # a destination that cannot cut a tensor: layer0.dense.weight (8, 12) by 5 devices
    shutil.copytree(f"{case}/strategy", tmp_path / "dst")
    for r in range(8):
        path = tmp_path / "dst" / f"ckpt_strategy_rank_{r}.ckpt"
        message = strategy_message(path)
        for item in message.parallel_layout_item:
            del item.parallel_layouts.dev_matrix[0].dim[:]
            item.parallel_layouts.dev_matrix[0].dim.extend([1, 5])
            item.parallel_layouts.opt_weight_shard_size = item.parallel_layouts.opt_weight_shard_step = 0
        path.write_bytes(message.SerializeToString())
    before = digest(tmp_path)
    assert transform_cli(*src, "--dst_ckpt_strategy", tmp_path / "dst", "--dst_ckpt_dir", tmp_path / "out") == 2
    assert_one_error(capsys.readouterr().err, "the destination strategy cannot cut", "of size 12", "5 blocks")
    # an output folder holding someone's files is refused untouched; one holding an earlier transform is replaced
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    before = digest(tmp_path)
    assert transform_cli(*src, "--dst_ckpt_dir", tmp_path / "out") == 2
    assert_one_error(capsys.readouterr().err, "notes.txt", "pass a new or empty folder")
    assert digest(tmp_path) == before
    (tmp_path / "out" / "notes.txt").unlink()
    (tmp_path / "out" / "rank_3").mkdir()
    assert transform_cli(*src, "--dst_ckpt_dir", tmp_path / "out") == 0
    assert os.listdir(tmp_path / "out") == ["rank_0"]
    assert transform_cli("--src_ckpt_dir", f"{case}/checkpoint", "--dst_ckpt_dir", tmp_path / "x") == 2
    assert_one_error(capsys.readouterr().err, "nothing to transform")
    assert transform_cli(*src, "--dst_ckpt_dir", tmp_path / "x", "--prefix", "../up") == 2
    assert_one_error(capsys.readouterr().err, "--prefix")
    assert transform_cli("--src_ckpt_strategy", f"{case}/strategy/ckpt_strategy_rank_5.ckpt", "--src_ckpt_dir",
                         f"{case}/checkpoint", "--dst_ckpt_dir", tmp_path / "x") == 2
    assert_one_error(capsys.readouterr().err, "no strategy for pipeline stage 0", "folder holding every stage")
    assert not (tmp_path / "x").exists()


@needs_shared
def test_the_loaders_refuse_a_damaged_folder_in_one_line(tmp_path, capsys):
    shutil.copytree(f"{SHARED}/gpt2_dp1_mp2_pp2", tmp_path / "output", ignore=shutil.ignore_patterns("target"))
    (tmp_path / "output/checkpoint/rank_2/gpt2_rank_2-5_1.ckpt").unlink()
    np.save(tmp_path / "valid.npy", np.zeros((2, 32), np.uint16))
    assert load_script("evaluate.py").main(["--model", str(tmp_path / "output"), "--n_head", "4",
                                            "--eval_dataset_dir", str(tmp_path / "valid.npy"), "--seq_length", "32"]) == 2
    assert_one_error(capsys.readouterr().err, "rank_2", "no .ckpt file", "rank 2 is missing")
    assert load_script("convert/mindspore_to_hf.py").main(["--mindspore_path", str(tmp_path / "output/checkpoint"),
                                                           "--output_dir", str(tmp_path / "hf")]) == 2
    assert_one_error(capsys.readouterr().err, "--src_strategy_path_or_dir", "output/strategy")
    assert not (tmp_path / "hf").exists()


def test_strategy_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no strategy files"):
        read_strategy(OURS)  # a folder without strategy files
    (tmp_path / "s.json").write_text("{}")
    with pytest.raises(StrategyError, match="JSON strategy files"):
        read_strategy(str(tmp_path / "s.json"))


# ---------------------------------------------------------------------------------------------------------------
# memory: the largest full tensor and one rank's slices
# ---------------------------------------------------------------------------------------------------------------
MEASURE = r"""
import json, sys, torch
from gpt2_ascend.convert import transform_ckpt
from gpt2_ascend.mindspore_io.ckpt import read_ckpt

def rss(field):  # VmRSS now, VmHWM the peak (the kernel's hiwater_rss)
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field + ":"))

mode, root = sys.argv[1:]
warm = torch.zeros(1024, 1024)
warm[256:512] = torch.ones(256, 1024)  # torch's copy kernels and threads start before the measurement
del warm
open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current RSS (after the imports)
base = rss("VmRSS")
if mode == "merge":
    transform_ckpt(root + "/strategy", root + "/checkpoint", root + "/merged", "m")
elif mode == "cut":
    transform_ckpt(None, root + "/merged/rank_0/m0.ckpt", root + "/cut", "c", dst_ckpt_strategy=root + "/strategy")
else:  # every rank's slices in memory: what merging by loading everything costs
    ranks = [read_ckpt(f"{root}/checkpoint/rank_{r}/net.ckpt") for r in range(4)]
print(json.dumps({"delta": rss("VmHWM") - base}))
"""


def write_strategy(path, layouts: dict, stage=0):
    message = proto_messages("node_strategy.proto")["ParallelStrategyMap"]()
    message.current_stage = stage
    message.parallel_strategy_item.add(node_name="op").parallel_strategys.stage = stage
    for name, (dev_matrix, tensor_map) in layouts.items():
        item = message.parallel_layout_item.add(param_name=name)
        item.parallel_layouts.dev_matrix.add().dim.extend(dev_matrix)
        item.parallel_layouts.tensor_map.add().dim.extend(tensor_map)
        item.parallel_layouts.field = item.parallel_layouts.opt_weight_shard_step = 0
        item.parallel_layouts.opt_weight_shard_size = 0
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(message.SerializeToString())


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to reset peak RSS")
def test_memory_is_the_largest_tensor_and_one_ranks_slices(tmp_path):
    g = torch.Generator().manual_seed(0)
    params, rows = 6, 1024  # 6 tensors of 4 MiB cut over 4 ranks: 1 MiB slices, 6 MiB per rank, 24 MiB in all
    full = {f"w{i}": torch.randn(rows, 1024, generator=g) for i in range(params)}
    for rank in range(4):
        write_strategy(tmp_path / "strategy" / f"ckpt_strategy_rank_{rank}.ckpt", {n: ([4], [0, -1]) for n in full})
        write_ckpt(tmp_path / "checkpoint" / f"rank_{rank}" / "net.ckpt",
                   {n: t[rank * rows // 4:(rank + 1) * rows // 4] for n, t in full.items()})
    del full
    tensor, one_rank, total = 4 << 20, 6 << 20, 24 << 20

    # glibc's malloc raises its mmap threshold as big blocks are freed and then keeps freed memory in its heap for
    # reuse (up to twice the threshold): pinned at its initial 128 KiB, freed tensors go back to the kernel and the
    # peak RSS is what the program holds (unpinned, the merge's peak here was 11 MiB instead of 5.7)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")

    def measure(mode):
        run = subprocess.run([sys.executable, "-c", MEASURE, mode, str(tmp_path)], capture_output=True, text=True,
                             cwd=REPO, env=env)
        assert run.returncode == 0, run.stderr[-2000:]
        return json.loads(run.stdout.strip().splitlines()[-1])["delta"]

    merge, cut, loaded = measure("merge"), measure("cut"), measure("load")
    print(f"peak above baseline: merge {merge / 2**20:.1f} MiB, cut {cut / 2**20:.1f} MiB, every slice loaded "
          f"{loaded / 2**20:.1f} MiB (a tensor 4 MiB, a rank's slices 6 MiB, all 24 MiB)")
    assert loaded > 0.9 * total  # the measurement sees memory
    assert merge < tensor + one_rank and cut < tensor + one_rank
