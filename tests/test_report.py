"""Fleet report files (JSON, CSV, PNG, Markdown) and the rank-segment energy against a dense reference."""

from __future__ import annotations

import csv
import io
import json
import math

import pytest
import torch

from lorafleet.export.formats.adapter import Adapter, LoraPair, scaling_for
from lorafleet.export.formats.errors import ConfigError, LorafleetError
from lorafleet.fleet.rank_energy import rank_segments, segment_energy, segment_label
from lorafleet.fleet.records import PLOTS, FleetReport, RoundRecord, read_report
from lorafleet.fleet.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _report(rounds: int = 2) -> FleetReport:
    ranks = {f"d{i}": (4, 8, 16)[i % 3] for i in range(9)}
    profiles = {d: ("phone", "board")[i % 2] for i, d in enumerate(ranks)}
    rep = FleetReport({"method": "flexlora", "model": "random:tiny", "round_deadline_s": 5.0}, ranks, [], profiles)
    rep.add_round(RoundRecord(0, {"seen/rouge_l": 0.1, "heldout/rouge_l": 0.2, "seen/loss": math.nan}))
    for r in range(1, rounds + 1):
        times = {"d0": 1.0 * r, "d1": 2.5, "d2": 7.0}
        rep.add_round(RoundRecord(r, {"seen/rouge_l": 0.1 + r / 10, "heldout/rouge_l": 0.2, "seen/loss": 3.0 - r},
                                  ["d0", "d1"], ["d2"], 5.0, times, {"1-4": 0.7, "5-8": 0.2, "9-16": 0.1},
                                  online=7, sampled=["d0", "d1", "d2"], drop_reasons={"d2": "straggler"}))
    return rep


def test_write_report_produces_every_file_and_reads_back(tmp_path):
    rep = _report()
    written = write_report(tmp_path / "out", rep)
    names = {p.name for p in written}
    assert names == {"metrics.json", "metrics.csv", "summary.md", *PLOTS.values()}
    for name in PLOTS.values():
        data = (tmp_path / "out" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    back = read_report(tmp_path / "out")
    assert back.device_ranks == rep.device_ranks and back.device_profiles == rep.device_profiles
    assert [r.round for r in back.rounds] == [0, 1, 2]
    assert back.rounds[2] == rep.rounds[2]
    assert math.isnan(back.rounds[0].metrics["seen/loss"])
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporaries left
    import os

    umask = os.umask(0)
    os.umask(umask)
    assert all((p.stat().st_mode & 0o777) == 0o666 & ~umask for p in written)  # not owner-only temporaries


def test_metrics_json_has_the_documented_fields(tmp_path):
    write_report(tmp_path, _report())
    data = json.loads((tmp_path / "metrics.json").read_text())  # strict JSON: NaN written as null
    assert {"rounds", "device_ranks", "config"} <= set(data)
    assert data["rounds"][0]["metrics"]["seen/loss"] is None
    one = data["rounds"][1]
    assert one["participants"] == ["d0", "d1"] and one["dropped"] == ["d2"] and one["round_time_s"] == 5.0
    assert data["device_ranks"]["d2"] == 16 and data["config"]["method"] == "flexlora"
    assert one["drop_reasons"] == {"d2": "straggler"} and one["online"] == 7


def test_metrics_csv_has_one_row_per_round(tmp_path):
    write_report(tmp_path, _report(3))
    rows = list(csv.DictReader(io.StringIO((tmp_path / "metrics.csv").read_text())))
    assert [r["round"] for r in rows] == ["0", "1", "2", "3"]
    assert rows[0]["seen/loss"] == "" and rows[3]["seen/loss"] == "0"
    assert rows[2]["participants"] == "2" and rows[2]["dropped"] == "1"
    assert rows[2]["online"] == "7" and rows[2]["sampled"] == "3"
    assert rows[1]["energy/1-4"] == "0.7" and rows[0]["energy/9-16"] == ""


def test_summary_shows_rounds_fleet_change_and_plots(tmp_path):
    write_report(tmp_path, _report())
    text = (tmp_path / "summary.md").read_text()
    assert "| 4 | 3 |" in text and "| phone | 5 |" in text
    assert "| 0 | 0.2000 | 0.1000 | – | 0 | 0 | 0 | 0 | 0.0 |" in text  # NaN shown as a dash
    assert "| 2 | 0.2000 | 0.3000 | 1.0000 | 7 | 3 | 2 | 1 | 5.0 |" in text
    assert "seen/rouge_l: 0.1000 → 0.3000 (+0.2000)" in text
    for name in PLOTS.values():
        assert f"({name})" in text and (tmp_path / name).is_file()


def test_report_without_rounds_still_renders(tmp_path):
    write_report(tmp_path, FleetReport({}, {"a": 2}))
    assert (tmp_path / "round_times.png").read_bytes().startswith(PNG_MAGIC)


def test_devices_without_a_rank_are_reported_as_such(tmp_path):
    small, large = ({"rank": r, "memory": f"peak {m} GiB > memory budget 1 GiB"} for r, m in ((2, 1.5), (4, 1.6)))
    board = {"selected_rank": 2, "reasons": ["fits"], "candidates": [{**small, "memory": "peak 0.5 GiB ≤ 1 GiB"}]}
    rep = FleetReport({}, {"a": 2, "b": None}, [], {"a": "board", "b": "phone"},
                      {"profiles": {"board": board, "phone": {"selected_rank": None, "candidates": [small, large],
                                                             "reasons": ["no packaged rank fits"]}}})
    write_report(tmp_path, rep)
    text = (tmp_path / "summary.md").read_text()
    # a profile's predicted memory: its rank's, or (none fits) the smallest rank's
    assert "| none fits | 1 |" in text
    assert "| phone | 1 | none | peak 1.5 GiB > memory budget 1 GiB | no packaged rank fits |" in text
    assert "| board | 1 | 2 | peak 0.5 GiB ≤ 1 GiB | fits |" in text
    assert read_report(tmp_path).device_ranks == {"a": 2, "b": None}


def test_report_validation_names_the_problem():
    rep = _report(0)
    with pytest.raises(ConfigError, match="round 3 recorded where round 1 was expected"):
        rep.add_round(RoundRecord(3, {}))
    with pytest.raises(ConfigError, match=r"round 1 names unknown devices: \['zz'\]"):
        rep.add_round(RoundRecord(1, {}, ["zz"]))
    with pytest.raises(ConfigError, match="cannot both take part and be dropped"):
        rep.add_round(RoundRecord(1, {}, ["d0"], ["d0"]))
    with pytest.raises(ConfigError, match="round_time_s must be >= 0, got -1"):
        rep.add_round(RoundRecord(1, {}, round_time_s=-1))
    with pytest.raises(ConfigError, match="device_ranks must be positive integers or None"):
        FleetReport({}, {"a": 0})
    with pytest.raises(ConfigError, match="device_profiles names devices without a rank"):
        FleetReport({}, {"a": 1}, [], {"b": "phone"})


def test_read_report_of_a_missing_or_bad_file_is_one_error(tmp_path):
    with pytest.raises(LorafleetError, match="cannot read fleet report"):
        read_report(tmp_path)
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(LorafleetError, match="cannot read fleet report"):
        read_report(tmp_path)


# --- rank-segment energy ---------------------------------------------------------------------------------

def test_rank_segments_and_labels():
    assert rank_segments([8, 4, 4, 16]) == [(0, 4), (4, 8), (8, 16)]
    assert [segment_label(s) for s in rank_segments([1, 2, 8])] == ["1", "2", "3-8"]
    with pytest.raises(ConfigError, match="ranks must be positive integers"):
        rank_segments([0, 4])
    with pytest.raises(ConfigError, match="ranks must be positive integers"):
        rank_segments([])


def test_energy_of_an_svd_form_adapter_is_its_singular_value_share():
    """FlexLoRA's redistribution (B = U S / scaling, A = Vᵀ): segment shares are Σ s_i² shares (dense SVD)."""
    gen = torch.Generator().manual_seed(0)
    s16 = scaling_for(16, 32)
    modules, sq = {}, torch.zeros(16, dtype=torch.float64)
    for name in ("m.q_proj", "m.v_proj"):
        dw = torch.randn(24, 20, generator=gen, dtype=torch.float64)
        u, s, vh = torch.linalg.svd(dw, full_matrices=False)
        modules[name] = LoraPair(vh[:16], u[:, :16] * s[:16] / s16, s16)
        sq += s[:16] ** 2
    shares = segment_energy(Adapter(modules), rank_segments([4, 8, 16]))
    expected = [sq[:4].sum(), sq[4:8].sum(), sq[8:].sum()]
    assert list(shares.values()) == pytest.approx([float(e / sq.sum()) for e in expected], rel=1e-9)


def test_energy_of_a_general_adapter_matches_dense_segment_products():
    gen = torch.Generator().manual_seed(1)
    a8 = LoraPair(torch.randn(8, 10, generator=gen), torch.randn(12, 8, generator=gen), 0.5)
    a4 = LoraPair(torch.randn(4, 10, generator=gen), torch.randn(6, 4, generator=gen), 2.0)  # lacks 5-8
    shares = segment_energy(Adapter({"x": a8, "y": a4}), [(0, 4), (4, 8)])
    dense = [float(((0.5 * a8.lora_B[:, lo:hi] @ a8.lora_A[lo:hi]) ** 2).sum()) for lo, hi in ((0, 4), (4, 8))]
    dense[0] += float(((2.0 * a4.lora_B @ a4.lora_A) ** 2).sum())
    assert list(shares.values()) == pytest.approx([d / sum(dense) for d in dense], rel=1e-5)
    zero = Adapter({"x": LoraPair(torch.zeros(4, 3), torch.zeros(5, 4), 1.0)})
    assert segment_energy(zero, [(0, 2), (2, 4)]) == {"1-2": 0.0, "3-4": 0.0}
