"""The sequence study end to end, at its quick size."""

import json

import pytest

from untrainable.cli import main
from untrainable.experiment import EXPERIMENTS
from untrainable.recipes import sequence


@pytest.mark.slow
def test_quick_sequence_study_writes_its_tables(tmp_path):
    assert main(["run", "sequence", "--quick", "--out", str(tmp_path)]) == 0
    for name, metric in (("copy-paste-quick", "accuracy"), ("parity-quick", "accuracy"), ("lm-quick", "perplexity")):
        folder = tmp_path / name
        assert (folder / "table.md").exists() and (folder / "curves.png").exists()
        table = json.loads((folder / "table.json").read_text())
        assert table["metric"] == metric
        assert len(table["rows"]) == 4 and all(row["seeds"] == len(sequence.QUICK_SEEDS) for row in table["rows"])
    parity = json.loads((tmp_path / "parity-quick" / "table.json").read_text())
    assert all("long_accuracy" in row for row in parity["rows"])
    lm = json.loads((tmp_path / "lm-quick" / "table.json").read_text())
    assert all("test_bpc" in row for row in lm["rows"])
    assert "bits per character" in (tmp_path / "lm-quick" / "table.md").read_text()


def test_study_arms_and_guides():
    experiments = EXPERIMENTS.create("sequence")
    assert [e.name for e in experiments] == ["copy-paste", "parity", "lm"]
    for experiment in experiments:
        assert len(experiment.seeds) >= 3
        arms = {arm.name: arm for arm in experiment.arms}
        assert len(arms) == 4
        trained = [arm for arm in experiment.arms if arm.guide_from]
        assert len(trained) == 1
        source = arms[trained[0].guide_from].config.model
        # The trained guide is the other arm's architecture, so its weights load.
        assert (source.name, source.args) == (trained[0].config.guide.name, trained[0].config.guide.args)
    lm = experiments[2]
    assert (lm.metric, lm.higher_is_better) == ("perplexity", False)


def test_long_copy_paste_uses_the_papers_lengths():
    from untrainable.experiment import EXPERIMENTS

    experiment = EXPERIMENTS.create("sequence-copy-paste-long", quick=False)
    assert [arm.name for arm in experiment.arms] == [
        "transformer",
        "rnn",
        "rnn+untrained-transformer",
        "rnn+trained-transformer",
    ]
    for arm in experiment.arms:
        assert (arm.config.data.args["min_len"], arm.config.data.args["max_len"]) == (20, 40)
        assert arm.config.train.epochs == 40
        for spec in (arm.config.model, arm.config.guide):
            if spec is not None and spec.name == "causal_transformer":
                assert spec.args["max_len"] == 2 * 40 + 2  # sequence, COPY, blanks, END
