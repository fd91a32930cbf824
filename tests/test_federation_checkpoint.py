"""Server checkpoints (server/checkpoint.py): saved after every round, crash-safe at every step of a save."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from export_helpers import random_adapter

from lorafleet.server.checkpoint import Checkpoint, CheckpointError, ServerState


def same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def state(round_: int) -> ServerState:
    return ServerState(method="hetlora", rounds=3, round=round_, global_rank=8, node_ranks={"7": 4},
                       history=[{"round": i} for i in range(1, round_ + 1)])


def test_save_then_load(tmp_path):
    ckpt = Checkpoint(tmp_path / "s")
    ckpt.save(state(1), random_adapter(8, seed=1))
    loaded, adapter = ckpt.load()
    assert loaded == state(1)
    assert same(adapter, random_adapter(8, seed=1))
    data = json.loads((tmp_path / "s" / "state.json").read_text())
    assert data["round"] == 1 and data["method"] == "hetlora" and len(data["global_sha256"]) == 64
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["global", "state.json"]


def test_a_crash_before_the_final_swap_is_repaired(tmp_path):
    """Killed between writing state.json (round 2) and swapping global.next into global/."""
    ckpt = Checkpoint(tmp_path / "s")
    ckpt.save(state(1), random_adapter(8, seed=1))
    ckpt.save(state(2), random_adapter(8, seed=2))
    shutil.move(tmp_path / "s" / "global", tmp_path / "s" / "global.next")  # round 2's adapter, not yet swapped
    shutil.copytree(_written(tmp_path, 1), tmp_path / "s" / "global")  # round 1's still in place
    loaded, adapter = ckpt.load()
    assert loaded.round == 2 and same(adapter, random_adapter(8, seed=2))
    assert not (tmp_path / "s" / "global.next").exists()


def test_a_crash_between_the_two_renames_is_repaired(tmp_path):
    ckpt = Checkpoint(tmp_path / "s")
    ckpt.save(state(1), random_adapter(8, seed=1))
    shutil.move(tmp_path / "s" / "global", tmp_path / "s" / "global.next")  # global/ renamed away, new not in
    loaded, adapter = ckpt.load()
    assert loaded.round == 1 and same(adapter, random_adapter(8, seed=1))


def test_a_crash_before_state_json_keeps_the_previous_round(tmp_path):
    """Killed after writing global.next but before state.json: the previous round is what was saved."""
    ckpt = Checkpoint(tmp_path / "s")
    ckpt.save(state(1), random_adapter(8, seed=1))
    shutil.copytree(_written(tmp_path, 2), tmp_path / "s" / "global.next")
    loaded, adapter = ckpt.load()
    assert loaded.round == 1 and same(adapter, random_adapter(8, seed=1))


def test_a_damaged_directory_is_reported(tmp_path):
    ckpt = Checkpoint(tmp_path / "s")
    ckpt.save(state(1), random_adapter(8, seed=1))
    shutil.rmtree(tmp_path / "s" / "global")
    shutil.copytree(_written(tmp_path, 3), tmp_path / "s" / "global")
    with pytest.raises(CheckpointError, match="neither global/ nor global.next/ matches"):
        ckpt.load()


def test_a_new_run_refuses_a_used_directory(tmp_path):
    ckpt = Checkpoint(tmp_path / "s")
    ckpt.check_new()
    ckpt.save(state(2), random_adapter(8))
    with pytest.raises(CheckpointError, match=r"already holds a run \(hetlora, round 2 of 3\): pass --resume"):
        ckpt.check_new()


def test_nothing_to_resume(tmp_path):
    with pytest.raises(CheckpointError, match="holds no state.json"):
        Checkpoint(tmp_path).load()
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        Checkpoint(tmp_path).load()
    (tmp_path / "state.json").write_text('{"version": 99}')
    with pytest.raises(CheckpointError, match="is not a lorafleet server state"):
        Checkpoint(tmp_path).load()


def _written(tmp_path, seed):
    from lorafleet.export.formats.adapter import write_adapter

    out = tmp_path / f"adapter-{seed}"
    if not out.exists():
        write_adapter(random_adapter(8, seed=seed), out)
    return out


def _edited(tmp_path, **fields):
    ckpt = Checkpoint(tmp_path / "s")
    ckpt.save(state(2), random_adapter(8))
    data = json.loads(ckpt.state_file.read_text())
    data.update(fields)
    ckpt.state_file.write_text(json.dumps(data))
    return ckpt


@pytest.mark.parametrize(("fields", "match"), [
    ({"round": -5}, r"field 'round': Input should be greater than or equal to 0"),
    ({"round": "abc"}, r"field 'round': Input should be a valid integer, got 'abc'"),
    ({"round": 2.0}, r"field 'round': Input should be a valid integer"),
    ({"rounds": 0}, r"field 'rounds'"),
    ({"round": 3}, r"round 3 of 3 with 2 history entries is inconsistent"),
    ({"method": 7}, r"field 'method'"),
    ({"global_rank": True}, r"field 'global_rank'"),
    ({"node_ranks": {"1": "four"}}, r"field 'node_ranks.1'"),
    ({"node_ranks": {"1": -4}}, r"node_ranks must be non-negative"),
    ({"history": "none"}, r"field 'history'"),
    ({"finished": "yes"}, r"field 'finished'"),
    ({"surprise": 1}, r"field 'surprise': Extra inputs are not permitted"),
    ({"global_sha256": "00"}, r"field 'global_sha256'"),
])
def test_every_state_field_is_checked_on_load(tmp_path, fields, match):
    ckpt = _edited(tmp_path, **fields)
    with pytest.raises(CheckpointError, match=match):
        ckpt.load()


def test_a_missing_field_is_named(tmp_path):
    ckpt = Checkpoint(tmp_path / "s")
    ckpt.save(state(1), random_adapter(8))
    data = json.loads(ckpt.state_file.read_text())
    del data["rounds"]
    ckpt.state_file.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="missing field 'rounds'"):
        ckpt.load()


def test_resume_without_a_state_refuses_and_touches_nothing(tmp_path):
    ckpt = Checkpoint(tmp_path / "s")
    ckpt.save(state(2), random_adapter(8, seed=4))
    ckpt.state_file.unlink()  # the trained adapter is still there
    before = _tree(tmp_path / "s")
    with pytest.raises(CheckpointError, match="holds no state.json, so there is nothing to resume"):
        ckpt.check_resumable()
    with pytest.raises(CheckpointError, match=r"holds a global adapter \(global/\) but no state.json: refusing"):
        ckpt.check_new()  # and a fresh run must not overwrite it either
    assert _tree(tmp_path / "s") == before


def test_resume_of_an_empty_or_missing_directory_refuses(tmp_path):
    for d in (tmp_path / "missing", tmp_path):
        with pytest.raises(CheckpointError, match="nothing to resume"):
            Checkpoint(d).check_resumable()


def _tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
