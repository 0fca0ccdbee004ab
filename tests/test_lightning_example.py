"""examples/lightning_guidance.py: the target learns, the guide stays frozen, and under DDP the CKA is the global batch's."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_run import Recorder, load_example
from untrainable.similarity import linear_cka

RUN = Path(__file__).with_name("lightning_run.py")


def buffers_free(state):
    """The state's parameters: BatchNorm running statistics are each rank's own under DDP, by design."""
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and ".norm.running_" not in k}


def test_target_learns_and_guide_is_unchanged(tmp_path):
    recorder = Recorder()
    args = ["--max-steps", "60", "--accelerator", "cpu", "--devices", "1", "--num-samples", "2000"]
    trainer = load_example().main([*args, "--out", str(tmp_path)], callbacks=[recorder])
    task = [step["task_loss"] for step in recorder.steps]
    assert len(task) == 60
    # Seed 0: about 2.38 over the first ten steps, 1.73 over the last ten (chance is ln 10 = 2.30).
    assert sum(task[-10:]) / 10 < sum(task[:10]) / 10 - 0.4
    assert all(0.0 < step["guidance_loss"] < 2.0 for step in recorder.steps)
    guidance = trainer.lightning_module.guidance
    guide_params = {id(p) for p in guidance.guide.parameters()}
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimised == {id(p) for p in guidance.target.parameters()} and not optimised & guide_params
    assert not any(m.training for m in guidance.guide.modules())
    before = {k: v for k, v in recorder.first["state"].items() if k.startswith("guidance.guide_models.")}
    assert before and all(torch.equal(recorder.last[k], v) for k, v in before.items())


@pytest.mark.slow
def test_ddp_logs_the_global_batch_guidance_loss(tmp_path):
    args = ["--max-steps", "20", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--num-samples", "2000"]
    command = [sys.executable, str(RUN), str(tmp_path / "record"), *args, "--out", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / "record" / f"rank{r}.pt", weights_only=True) for r in range(2)]
    # Every step, both ranks log one guidance loss (that of the global batch) but their own task loss.
    assert len(ranks[0]["steps"]) == len(ranks[1]["steps"]) == 20
    for zero, one in zip(ranks[0]["steps"], ranks[1]["steps"]):
        assert zero["guidance_loss"] == pytest.approx(one["guidance_loss"], rel=1e-6)
    assert any(zero["task_loss"] != one["task_loss"] for zero, one in zip(ranks[0]["steps"], ranks[1]["steps"]))
    # The gradients went through the gather's backward and DDP: the ranks end with the same weights.
    last = [buffers_free(rank["last"]) for rank in ranks]
    assert all(torch.equal(value, last[1][key]) for key, value in last[0].items())

    # The first step's value, recomputed in this process from both ranks' batches and the starting weights.
    module = load_example().GuidedClassifier()
    module.load_state_dict(ranks[0]["first"]["state"])
    guidance = module.guidance.train()
    xs = [rank["first"]["batch"][0] for rank in ranks]
    with torch.no_grad():
        # Each rank's target forward normalises by its own batch (BatchNorm), so the target runs per rank.
        target_acts = [guidance.target_capture.run(x)[1] for x in xs]
        guide_acts = [guidance.run_guide(x) for x in xs]
        terms = []
        for pair in guidance.pairs:
            t = torch.cat([acts[pair.target].flatten(1) for acts in target_acts])
            g = torch.cat([acts[pair.guide].flatten(1) for acts in guide_acts])
            terms.append(pair.weight * (1 - linear_cka(t, g)))
        expected = guidance.alpha * float(sum(terms))
        local = [float(guidance(x).guidance_loss) for x in xs]
    logged = ranks[0]["steps"][0]["guidance_loss"]
    assert logged == pytest.approx(expected, rel=1e-5)
    assert all(abs(value - expected) > 0.02 for value in local)  # each rank's own batch alone gives another value
