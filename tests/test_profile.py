"""continual-bench profile: Snakemake's benchmark files summed per step and method, and the bound on elapsed time."""
import pytest

from continual_bench.cli import main
from continual_bench.reporting.profile import benchmark_files, profile, read_benchmarks
from continual_bench.utils import UserError

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def _bench(path, s, rss=100.0, cpu="NA"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + f"{s}\t0:00:00\t{rss}\t1\t1\t1\t0\t0\t0\t{cpu}\n")


@pytest.fixture()
def folder(tmp_path):
    run = tmp_path / "results" / "toy"
    for method, s in (("lora", 100.0), ("c_lora", 50.0)):
        _bench(run / f"runs/toy_faces/T5/{method}/seed0/logs/train.tsv", s, rss=900.0, cpu=s * 0.9)
        _bench(run / f"runs/toy_faces/T5/{method}/seed0/logs/generate.tsv", 10.0)
    _bench(run / "logs/tables.tsv", 5.0)
    _bench(run / "logs/noise_floor_toy_faces.tsv", 25.0)
    _bench(tmp_path / "logs/toy/vae.tsv", 200.0, rss=1500.0)
    return tmp_path


def test_profile_sums_steps_and_methods_and_bounds_the_elapsed_time(folder):
    files = benchmark_files(folder / "results/toy", [folder / "logs/toy", folder / "logs/paper"])
    jobs = read_benchmarks(files, folder / "results/toy")
    assert len(jobs) == 7 and jobs["s"].sum() == 400.0
    p = profile(jobs, cores=2)
    assert p["work_s"] == 400.0 and p["bound_s"] == 200.0  # 400 s of work on 2 cores
    assert profile(jobs, cores=4)["bound_s"] == 200.0      # the VAE alone takes 200 s
    steps = p["steps"]
    assert steps.loc["train", "wall_s"] == 150.0 and steps.loc["train", "jobs"] == 2
    assert steps.loc["train", "cpu_s"] == pytest.approx(135.0) and steps.loc["train", "peak_rss_mb"] == 900.0
    assert steps.loc["toy/vae", "peak_rss_mb"] == 1500.0 and steps.loc["noise_floor", "wall_s"] == 25.0
    assert steps.index[0] == "toy/vae"  # the most expensive step first
    assert p["methods"].loc[("toy_faces", 5, "lora"), "wall_s"] == 110.0


def test_profile_cli_and_bad_files(folder, capsys, monkeypatch):
    monkeypatch.chdir(folder)
    assert main(["profile", "results/toy", "--elapsed", "250", "--out", "jobs.csv"]) in (0, None)
    out = capsys.readouterr().out
    assert out.startswith("7 jobs, 400 s of work (longest job 200 s): on 2 cores no schedule takes less than 200 s")
    assert "80 % efficient" in out and "toy/vae" in out and "c_lora" in out
    assert len((folder / "jobs.csv").read_text().splitlines()) == 8
    (folder / "logs/toy/vae.tsv").write_text("not\ta benchmark\n")
    with pytest.raises(UserError, match="logs/toy/vae.tsv: not a Snakemake benchmark file"):
        read_benchmarks([folder / "logs/toy/vae.tsv"], folder / "results/toy")
    with pytest.raises(UserError, match="no benchmark files"):
        profile(read_benchmarks([], folder / "results/toy"), 2)
