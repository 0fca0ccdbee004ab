"""SLURM settings without a cluster: the [slurm] table, its one-line errors, flags, torchrun's variables from SLURM's."""

from pathlib import Path

import pytest

from untrainable import cli
from untrainable.cluster import load_cluster, time_minutes
from untrainable.config import ConfigError
from untrainable.distributed import export_slurm_env, first_node

EXAMPLE = Path(__file__).resolve().parents[1] / "configs" / "cluster_example.toml"


def test_the_shipped_example_loads_into_submitit_parameters(tmp_path):
    settings = load_cluster(EXAMPLE)
    assert settings.time == 24 * 60 and settings.gpus_per_run == 4
    params = settings.executor_parameters()
    assert params["ntasks_per_node"] == 4 and params["gpus_per_node"] == 4  # one task per GPU
    assert params["signal_delay_s"] == 120 and params["partition"] == "gpu"
    # submitit writes the batch script from the same names without a cluster (its executor needs `srun` on PATH):
    # an unknown name is a TypeError here, and each value reaches its #SBATCH line.
    from submitit.slurm.slurm import _make_sbatch_string

    script = _make_sbatch_string(command="python -m untrainable", folder=tmp_path, **params)
    for line in ("#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4", "#SBATCH --partition=gpu"):
        assert line in script.splitlines()
    assert "#SBATCH --time=1440" in script.splitlines()


def test_flags_override_the_file(tmp_path):
    settings = load_cluster(EXAMPLE, {"partition": "debug", "time": "0:30:00", "gpus_per_run": None})
    assert (settings.partition, settings.time, settings.gpus_per_run) == ("debug", 30, 4)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[slurm]\npartiton = 'gpu'\n", "unknown key(s) ['partiton']"),
        ("[slurm]\ngpus_per_run = -1\n", "slurm.gpus_per_run: expected an integer >= 0"),
        ("[slurm]\ntime = 'soon'\n", "slurm.time: 'soon' is not a time"),
        ("[slurm]\ncpus_per_run = 'four'\n", "slurm.cpus_per_run: expected an integer"),
        ("[slurm]\ntime = 1\nsignal_delay_s = 120\n", "slurm.signal_delay_s: 120 s is not shorter than slurm.time"),
        ("[slurm]\nnodes = 2\ngpus_per_run = 3\n", "slurm.gpus_per_run: 3 GPUs do not split evenly over 2 nodes"),
        ("[slurm]\nsbatch = 3\n", "slurm.sbatch: expected a table"),
        ("[cluster]\n", "expected one [slurm] table"),
        ("[slurm\n", "is not valid TOML"),
    ],
)
def test_bad_settings_are_one_line_naming_the_file_and_field(tmp_path, text, expected):
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_cluster(path)
    message = str(err.value)
    assert expected in message and str(path) in message and "\n" not in message


def test_time_limits_in_sbatch_spellings():
    assert [time_minutes(v) for v in (90, "90", "1:30:00", "2-00:00", "1-2", "10:30")] == [90, 90, 90, 2880, 1560, 11]


def test_torchrun_variables_from_a_slurm_task():
    env = {
        "SLURM_NTASKS": "4",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_ID": "1234",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
    }
    assert export_slurm_env(env)
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == ("3", "1", "4", "2")
    assert env["MASTER_ADDR"] == "gpu07" and env["MASTER_PORT"] == str(20000 + 1234)
    single = {"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}
    assert not export_slurm_env(single) and "RANK" not in single  # one task stays one process
    assert first_node("a1,b[2-3]") == "a1" and first_node("n[10,12]") == "n10"


# `run` a study, `tune` a config with K workers: the same flags, the same refusals.
COMMANDS = {
    "run": ["run", "mnist1d", "--quick", "--out", "unused"],
    "tune": ["tune", "--config", "c.toml", "--space", "s.toml", "--trials", "4", "--workers", "2", "--out", "unused"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_without_sbatch_the_slurm_executor_is_one_line_saying_what_to_install(command, monkeypatch, capsys):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert cli.main([*COMMANDS[command], "--executor", "slurm"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "sbatch" in err and "apt-get install" in err and "--executor local" in err


@pytest.mark.parametrize("command", COMMANDS)
def test_slurm_flags_with_the_local_executor_are_refused(command, capsys):
    assert cli.main([*COMMANDS[command], "--partition", "gpu", "--detach"]) == 2
    assert "--partition, --detach: only with --executor slurm" in capsys.readouterr().err


@pytest.mark.parametrize("changes", [{"tasks_per_node": 2}, {"nodes": 2}, {"gpus_per_run": 2}])
def test_a_tuning_worker_job_is_one_task(changes):
    from untrainable.cluster import SlurmSettings
    from untrainable.compare import run_workers

    with pytest.raises(ConfigError, match="a tuning worker is a job of one task"):
        run_workers(Path("unused"), None, "study", 2, cluster=SlurmSettings(**changes))
