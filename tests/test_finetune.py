"""`kmp finetune --qat int4` (kmp.gpt.finetune) on a finished micro run: the QAT model's
int4 forward is Keras's int4 model, the saved model reloads to what was measured, and the
run is only read."""

import json

from _helpers import snapshot

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
    assert r["qat_val_loss"] != r["ptq_val_loss"]  # it trained
    for key in ("control_float_val_loss", "control_int4_val_loss", "recovered_vs_control"):
        assert key in r
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
