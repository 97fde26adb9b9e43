"""`kmp finetune --qat int4` (kmp.gpt.finetune) on a finished micro run: the QAT model's
int4 forward is Keras's int4 model, the saved model reloads to what was measured, and the
run is only read."""

import json
import math
import shutil

import pytest
from _helpers import snapshot

import kmp
from kmp.cli import main


def test_qat_fine_tunes_quantizes_and_prices_against_ptq_and_a_control(micro_run, tmp_path,
                                                                       capsys):
    before = snapshot(micro_run)
    out = tmp_path / "qat"
    assert main(["finetune", "--run", str(micro_run), "--qat", "int4", "--steps", "6",
                 "--points", "1", "--out", str(out)]) == 0
    r = json.loads((out / "finetune.json").read_text())
    assert r["policy"] == "mixed_bfloat16" and r["steps"] == 6
    # Step 0 of the QAT curve is the fake-quantized source: Keras's int4 model of it (up to
    # bfloat16 rounding of the dequantized weights).
    assert [s for s, _ in r["qat_curve"]] == [0, 6]
    assert abs(r["qat_curve"][0][1] / r["ptq_val_loss"] - 1) < 2e-3, r
    assert abs(r["qat_curve"][-1][1] / r["qat_val_loss"] - 1) < 2e-3, r
    assert abs(r["reload_val_loss"] / r["qat_val_loss"] - 1) < 1e-5
    # It trained: 6 steps of an under-trained micro model lower the int4 model's loss, the
    # QAT run's and the float control's alike.
    assert r["qat_val_loss"] < r["ptq_val_loss"] and r["control_float_val_loss"] < r[
        "source_val_loss"]
    gap = r["control_int4_val_loss"] - r["control_float_val_loss"]
    share = (r["control_int4_val_loss"] - r["qat_val_loss"]) / gap if gap > 0 else math.nan
    assert r["recovered_vs_control"] == pytest.approx(share, nan_ok=True)
    assert r["size_bytes"] == (out / "qat-int4.keras").stat().st_size
    assert (out / "finetune.png").stat().st_size > 0
    assert "QAT 6 steps, then int4" in (out / "finetune.md").read_text()
    assert snapshot(micro_run) == before  # the run is only read
    capsys.readouterr()

    assert main(["finetune", "--run", str(micro_run), "--qat", "int2", "--out",
                 str(tmp_path / "x")]) == 2
    assert main(["finetune", "--run", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "Unknown QAT mode 'int2'" in err[0]
    assert "is not a finished kmp pretrain run" in err[1]


def test_the_qat_summary_says_so_when_int4_left_no_gap():
    # An under-trained model can lose nothing (or gain) from int4 rounding: a share of a gap
    # that is not there is NaN in finetune.json, and the table says it in words.
    from kmp.gpt.finetune import recovered, table

    r = {"steps": 30, "source_val_loss": 6.2202, "ptq_val_loss": 6.2196, "qat_val_loss": 6.1886,
         "qat_float_val_loss": 6.1916, "control_float_val_loss": 6.1911,
         "control_int4_val_loss": 6.1893}
    r.update(recovered(r))
    assert math.isnan(r["recovered_vs_source"]) and math.isnan(r["recovered_vs_control"])
    text = table(r)
    assert "nan" not in text and "no gap for QAT to close" in text
    r.update(ptq_val_loss=6.30, control_int4_val_loss=6.25)
    r.update(recovered(r))
    assert "QAT closes 140% of int4 PTQ's gap" in table(r)  # 0.1114 / 0.0798
    assert "; 104% of the gap the control still has" in table(r)


def test_the_qat_file_generates_from_text(micro_run, tmp_path):
    import keras

    from kmp.gpt import finetune_run

    finetune_run(micro_run, tmp_path, steps=1, points=1, control=False, log=lambda *a: None)
    model = keras.saving.load_model(tmp_path / "qat-int4.keras")
    text = model.generate("def", max_length=8)
    assert isinstance(text, str) and text.startswith("def")


@pytest.mark.parametrize("given,message", [
    (dict(learning_rate=-1e-3), "learning_rate must be a finite number > 0"),
    (dict(learning_rate=math.nan), "learning_rate must be a finite number > 0"),
    (dict(learning_rate=math.inf), "learning_rate must be a finite number > 0"),
    (dict(learning_rate=0), "learning_rate must be a finite number > 0"),
    (dict(steps=0), "steps must be a positive integer"),
    (dict(steps=2.5), "steps must be a positive integer"),
    (dict(points=0), "points must be a positive integer"),
])
def test_bad_arguments_are_refused_before_the_run_is_read(given, message, tmp_path):
    from kmp.gpt import finetune_run

    with pytest.raises(kmp.UserError, match=message):  # not "not a finished run"
        finetune_run(tmp_path / "no-run", tmp_path / "out", **given, log=lambda *a: None)
    assert not any(tmp_path.iterdir())  # nothing written


def test_fine_tuning_reads_past_the_windows_a_recovery_skipped(micro_run, tmp_path,
                                                               monkeypatch):
    from kmp.gpt import finetune

    run = shutil.copytree(micro_run, tmp_path / "run",
                          ignore=shutil.ignore_patterns("tensorboard"))
    path = run / "checkpoints" / "latest.json"
    record = json.loads(path.read_text())
    record.pop("position", None)  # a record that counts batches: the skipped windows count
    record.pop("epoch", None)
    record["batches"] = 20
    record["extra"]["recovery"] = {**record["extra"].get("recovery", {}), "skip": [[5, 9]]}
    path.write_text(json.dumps(record))
    starts = []

    class Read(Exception):
        pass

    def train_dataset(cache, seq_len, batch_size, seed, start, stop, *args, **kwargs):
        starts.append((start, stop))
        raise Read

    monkeypatch.setattr(finetune.data, "train_dataset", train_dataset)
    with pytest.raises(Read):
        finetune.finetune_run(run, tmp_path / "qat", steps=2, points=1, log=lambda *a: None)
    # 20 batches read around 5 skipped positions (5-9): the first unread window is 25.
    assert starts == [(25, 27)]
