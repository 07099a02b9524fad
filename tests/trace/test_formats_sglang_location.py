"""`moescope placement` -> the files SGLang loads: `--init-expert-location` maps and the stat-mode expert
distribution dump, read back by a loader written here from SGLang's definition (sgl-project/sglang,
python/sglang/srt/eplb/expert_location.py: compute_initial_expert_location_metadata, init_by_mapping,
init_by_eplb, _compute_logical_to_all_physical_map; expert_distribution.py: _StatAccumulator.dump), and the loop
SGLang dump -> `moescope import --format sglang` -> `placement` -> engine file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moescope.cli.main import main
from moescope.trace.formats.sglang_location import DecoderLayout

DECODER_LAYERS, E, K, SLOTS = 4, 8, 2, 8  # decoder layer 0 dense (DeepSeek's first_k_dense_replace), top-2


def sglang_load_location(path: Path, *, num_layers: int, num_logical: int, ep_size: int, redundant: int) -> dict:
    """What SGLang builds from `--init-expert-location path`, written from its definition (not moescope's code).

    Returns {"physical_to_logical": int [layers, P], "logical_to_all_physical": list per layer and logical expert}
    for a mapping file, or {"logical_count": int [X, layers, E]} for a load SGLang re-plans at start.
    """
    data = torch.load(path, weights_only=True) if path.suffix == ".pt" else json.loads(path.read_text())
    assert isinstance(data, dict)
    if "physical_to_logical_map" in data:
        assert set(data) == {"physical_to_logical_map"}  # init_by_mapping(server_args, model_config, **data_dict)
        p2l = torch.as_tensor(data["physical_to_logical_map"])
        num_physical = num_logical + redundant  # _init_common: logical + ep_num_redundant_experts
        assert not p2l.dtype.is_floating_point and tuple(p2l.shape) == (num_layers, num_physical)
        assert num_physical % ep_size == 0
        l2all = [[[] for _ in range(num_logical)] for _ in range(num_layers)]
        for layer in range(num_layers):
            for physical in range(num_physical):
                l2all[layer][int(p2l[layer, physical])].append(physical)
        # compute_logical_to_rank_dispatch_physical_map draws from each logical expert's replicas: none is empty
        assert all(replicas for layer in l2all for replicas in layer)
        return {"physical_to_logical": p2l.numpy(), "logical_to_all_physical": l2all}
    assert "logical_count" in data
    count = torch.as_tensor(data["logical_count"])
    count = count.unsqueeze(0) if count.dim() == 2 else count  # init_by_eplb
    assert count.dim() == 3 and tuple(count.shape[1:]) == (num_layers, num_logical)
    return {"logical_count": count.numpy()}


def per_token_dump(path: Path, rng, passes: int = 3, tokens: int = 7) -> np.ndarray:
    """An SGLang per_token dump (layout of trace/formats/sglang.py's docstring); returns logical ids [L, T, k]."""
    p2l = torch.arange(E + 2) % E  # 2 redundant physical experts
    records, logical_all = [], []
    for i in range(passes):
        logical = np.argsort(rng.random((DECODER_LAYERS - 1, tokens, E)) ** np.arange(1, E + 1), axis=-1)[..., :K]
        physical = logical + np.where((logical < 2) & (rng.random(logical.shape) < 0.5), E, 0)
        ids = torch.full((DECODER_LAYERS, tokens, SLOTS), -1, dtype=torch.int32)
        ids[1:, :, :K] = torch.from_numpy(physical.astype(np.int32))
        records.append(dict(forward_pass_id=i, rank=0, gatherer_key="primary", input_ids=rng.integers(0, 500, tokens).tolist(),
                            positions=list(range(tokens)), extend_seq_lens=[tokens], forward_mode=1,
                            topk_ids_of_layer=ids))
        logical_all.append(logical)
    torch.save(dict(records=records, last_physical_to_logical_map=p2l.repeat(DECODER_LAYERS, 1)), path)
    return np.concatenate(logical_all, axis=1)


@pytest.mark.parametrize("gpus, redundant", [(2, 2), (4, 0), (1, 1)])
def test_an_sglang_dump_comes_back_as_files_sglang_loads(tmp_path, gpus, redundant):
    rng = np.random.default_rng(gpus)
    logical = per_token_dump(tmp_path / "expert_distribution_recorder_1.0_0.pt", rng)
    assert main(["import", str(tmp_path / "expert_distribution_recorder_1.0_0.pt"), "--format", "sglang",
                 "--n-experts", str(E), "--out", str(tmp_path / "trace")]) == 0
    out = tmp_path / "placement"
    assert main(["placement", str(tmp_path / "trace"), "--gpus", str(gpus), "--redundant", str(redundant),
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engine_files"]["decoder_layers_known"] is True
    maps = sorted(out.glob("sglang_init_expert_location_*.json"))
    assert maps and len(maps) == len(list(out.glob("physical_to_logical_*.npy")))
    for path in maps:
        policy = path.stem.removeprefix("sglang_init_expert_location_")
        got = sglang_load_location(path, num_layers=DECODER_LAYERS, num_logical=E, ep_size=gpus, redundant=redundant)
        ours = np.load(out / f"physical_to_logical_{policy}.npy")  # [MoE layers, P]
        np.testing.assert_array_equal(got["physical_to_logical"][1:], ours)
        np.testing.assert_array_equal(got["physical_to_logical"][0], np.arange(E + redundant) % E)  # dense: trivial

    load = sglang_load_location(out / "sglang_expert_distribution.pt", num_layers=DECODER_LAYERS, num_logical=E,
                                ep_size=gpus, redundant=redundant)["logical_count"]
    expected = np.stack([np.bincount(layer.ravel(), minlength=E) for layer in logical])  # [MoE layers, E]
    np.testing.assert_array_equal(load[0, 1:], expected)
    assert load.shape[0] == 1 and not load[0, 0].any()


def test_the_distribution_dump_is_read_back_as_sglang_stat_dump_by_the_importer_s_loader(tmp_path):
    """moescope's own SGLang reader knows the stat layout: it names it instead of taking it for tokens."""
    per_token_dump(tmp_path / "d.pt", np.random.default_rng(0))
    main(["import", str(tmp_path / "d.pt"), "--format", "sglang", "--n-experts", str(E), "--out", str(tmp_path / "t")])
    main(["placement", str(tmp_path / "t"), "--gpus", "2", "--out", str(tmp_path / "p")])
    from moescope.errors import ImportFormatError
    from moescope.trace.formats.sglang import load_dump

    with pytest.raises(ImportFormatError, match="an SGLang 'stat' dump"):
        load_dump(tmp_path / "p" / "sglang_expert_distribution.pt")


def test_a_load_table_has_no_decoder_layers_so_moe_layer_i_is_decoder_layer_i(tmp_path):
    from moescope.trace.load_table import write_load_table

    tokens = np.random.default_rng(1).integers(0, 40, (2, 3, E))  # [W, L, E]
    write_load_table(tmp_path / "load.parquet", [0, 1], tokens)
    assert main(["placement", str(tmp_path / "load.parquet"), "--gpus", "2", "--out", str(tmp_path / "p")]) == 0
    assert json.loads((tmp_path / "p" / "summary.json").read_text())["engine_files"]["decoder_layers_known"] is False
    load = sglang_load_location(tmp_path / "p" / "sglang_expert_distribution.pt", num_layers=3, num_logical=E,
                                ep_size=2, redundant=2)["logical_count"]
    np.testing.assert_array_equal(load[0], tokens.sum(0))


def test_decoder_layout_from_a_capture_manifest():
    manifest = {"model": {"num_decoder_layers": 6}, "layers": [{"decoder_layer": d} for d in (1, 3, 5)]}
    assert DecoderLayout.from_manifest(manifest, 3) == DecoderLayout((1, 3, 5), 6, True)
    assert DecoderLayout.from_manifest({"layers": [{"decoder_layer": None}] * 2}, 2) == DecoderLayout((0, 1), 2, False)
