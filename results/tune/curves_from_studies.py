"""Budget curves of a comparison folder's two studies as they stand (finished or not).

    PYTHONPATH=src python results/tune/curves_from_studies.py STUDY_DIR OUT_DIR

Writes each arm's trials.json, best.toml and figures into STUDY_DIR/ARM (as a finished study
does), then OUT_DIR/budget.json and OUT_DIR/budget.png from every finished trial so far.
"""

import json
import sys
from pathlib import Path

from untrainable.budget import trial_records, write_curves
from untrainable.compare import finish_study
from untrainable.tune import open_study, read_study

study_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
records, sampler, metric, summaries = {}, "tpe", "accuracy", {}
for arm in ("alone", "guided"):
    _, _, settings, spec = read_study(study_dir / arm)
    summaries[arm] = finish_study(open_study(study_dir / arm, None, spec["study_name"]), study_dir / arm, arm)
    records[arm] = [trial_records(study_dir / arm)]
    sampler, metric = settings.sampler, spec["metric"]
sentence = write_curves(out, records, sampler, metric, metric == "accuracy")
print(json.dumps({arm: {k: s[k] for k in ("trials", "best_value", "best_params")} for arm, s in summaries.items()}))
print(sentence)
