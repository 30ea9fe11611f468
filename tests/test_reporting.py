"""Fast tests for continual_bench.reporting (summary, LaTeX/CSV tables, figures)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from continual_bench.reporting.figures import forgetting_curves, sample_grid
from continual_bench.reporting.summary import (
    SUMMARY_COLUMNS,
    direction,
    load_metrics,
    summarize,
    write_summary,
)
from continual_bench.reporting.tables import latex_escape, write_tables
from continual_bench.utils import UserError

# Hand-chosen per-seed values (seeds 0, 1, 2).
VALUES = {
    "lora_sequential": {"A_clip": [0.50, 0.60, 0.70], "A_mmd": [10.0, 12.0, 14.0], "N_train": [1_200_000] * 3},
    "full_ft": {"A_clip": [0.80, 0.90, 1.00], "A_mmd": [11.0, 13.0, 18.0], "N_train": [85_000] * 3},
}
EXTRA = ",cfg,abc123,torch==x,0.1,3.11"


def long_frame() -> pd.DataFrame:
    rows = []
    for method, metrics in VALUES.items():
        for metric, vals in metrics.items():
            for seed, v in enumerate(vals):
                rows.append(dict(track="t2i", benchmark="toy_faces", n_tasks=5, method=method,
                                 seed=seed, metric=metric, value=v))
    return pd.DataFrame(rows)


def write_run_files(tmp_path) -> list:
    """One metrics.csv per (method, seed), as the runs write them."""
    header = "track,benchmark,n_tasks,method,seed,metric,value,config_hash,git_commit,packages,continual_bench,python\n"
    paths = []
    df = long_frame()
    for (method, seed), g in df.groupby(["method", "seed"], sort=False):
        p = tmp_path / "runs" / method / str(seed) / "metrics.csv"
        p.parent.mkdir(parents=True)
        lines = [f"t2i,toy_faces,5,{method},{seed},{r.metric},{r.value}{EXTRA}\n" for r in g.itertuples()]
        p.write_text(header + "".join(lines))
        paths.append(p)
    return paths


def row(summary, method, metric):
    r = summary[(summary.method == method) & (summary.metric == metric)]
    assert len(r) == 1
    return r.iloc[0]


def test_summary_mean_std_and_columns(tmp_path):
    df = load_metrics(write_run_files(tmp_path))
    assert len(df) == 18
    s = summarize(df)
    assert list(s.columns) == SUMMARY_COLUMNS == [
        "track", "benchmark", "n_tasks", "method", "metric", "mean", "std", "n_seeds"]
    r = row(s, "lora_sequential", "A_mmd")
    assert r["mean"] == pytest.approx(12.0) and r["std"] == pytest.approx(2.0) and r["n_seeds"] == 3
    r = row(s, "full_ft", "A_mmd")  # deviations -3, -1, 4 -> var 26/2 = 13
    assert r["mean"] == pytest.approx(14.0) and r["std"] == pytest.approx(math.sqrt(13.0))
    r = row(s, "full_ft", "A_clip")
    assert r["mean"] == pytest.approx(0.9) and r["std"] == pytest.approx(0.1)
    assert row(s, "full_ft", "N_train")["std"] == 0.0
    # methods keep order of first appearance
    assert list(pd.unique(s.method)) == ["lora_sequential", "full_ft"]

    out = tmp_path / "summary.csv"
    write_summary(write_run_files(tmp_path / "again"), out)
    back = pd.read_csv(out)
    assert list(back.columns) == SUMMARY_COLUMNS and len(back) == 6


def test_single_seed_std_is_zero():
    df = long_frame()
    s = summarize(df[df.seed == 0])
    assert (s["std"] == 0.0).all() and (s["n_seeds"] == 1).all()


def test_direction():
    assert direction("A_clip") == "max" and direction("P_oracle") == "max"
    assert direction("A_mmd") == "min" and direction("P_mmd") == "min"
    assert direction("F_clip") == "min" and direction("F_whatever") == "min"
    assert direction("takeover") == "min"
    assert direction("N_train") is None and direction("N_other") is None
    assert direction("A_N") == "max" and direction("F_N") == "min"
    assert direction("mystery") is None


def test_bad_files_raise_user_error(tmp_path):
    no_value = tmp_path / "no_value_metrics.csv"
    no_value.write_text("track,benchmark,n_tasks,method,seed,metric\nt2i,toy_faces,5,m,0,A_mmd\n")
    with pytest.raises(UserError, match="no_value_metrics.csv") as err:
        load_metrics([no_value])
    assert "value" in str(err.value) and "\n" not in str(err.value)

    text_value = tmp_path / "text_value_metrics.csv"
    text_value.write_text("track,benchmark,n_tasks,method,seed,metric,value\nt2i,toy_faces,5,m,0,A_mmd,twelve\n")
    with pytest.raises(UserError, match="text_value_metrics.csv") as err:
        load_metrics([text_value])
    assert "twelve" in str(err.value) and "\n" not in str(err.value)


def test_tables_latex_bold_escape_and_welch(tmp_path):
    per_seed = long_frame()
    written = write_tables(summarize(per_seed), tmp_path / "tables", per_seed_df=per_seed)
    assert [p.name for p in written] == ["toy_faces_T5.csv", "toy_faces_T5.tex", "toy_faces_T5.html"]
    tex = written[1].read_text()

    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
    assert r"lora\_sequential" in tex and "lora_sequential" not in tex
    assert r"toy\_faces, 5 tasks, mean $\pm$ std over 3 seeds" in tex
    assert tex.startswith("%") and "Welch" in tex.splitlines()[1]
    # header: fixed order N_train, A_mmd, A_clip with arrows
    assert r"Method & N\_train & A\_mmd $\downarrow$ & A\_clip $\uparrow$ \\" in tex
    # max metric: full_ft best; min metric: lora_sequential best
    assert r"\textbf{0.90 $\pm$ 0.10}" in tex
    assert r"\textbf{12.00 $\pm$ 2.00}" in tex
    assert r"\textbf{0.60" not in tex and r"\textbf{14.00" not in tex
    # Welch: full_ft A_mmd (14 ± 3.61 vs 12 ± 2) overlaps the best -> underlined;
    # lora_sequential A_clip (0.6 vs 0.9, std 0.1, p ~ 0.02) is clearly worse -> not underlined.
    assert r"\underline{14.00 $\pm$ 3.61}" in tex
    assert r"\underline{0.60" not in tex and r"0.60 $\pm$ 0.10" in tex
    # parameter counts compact, no std, no bold (no direction)
    assert "1.2M" in tex and "85.0K" in tex and r"\textbf{1.2M}" not in tex

    # the HTML twin (shown inline by `snakemake --report`): the same cells and marks as CSS, no LaTeX
    import re

    page = written[2].read_text()
    assert "\\" not in page and "$" not in page and "toy_faces, 5 tasks, mean \u00b1 std over 3 seeds" in page
    assert "A_clip \u2191" in page and "A_mmd \u2193" in page and "Welch" in page
    styled = {sel.strip().lstrip("#"): props.strip()
              for sels, props in re.findall(r"(#T_\w+_row\d+_col\d+(?:, #T_\w+_row\d+_col\d+)*) \{([^}]*)\}", page)
              for sel in sels.split(",")}
    cell = lambda text: re.search(r'id="(T_\w+_row\d+_col\d+)"[^>]*>' + re.escape(text) + "<", page).group(1)
    assert styled[cell("12.00 \u00b1 2.00")].startswith("font-weight: bold")
    assert styled[cell("14.00 \u00b1 3.61")].startswith("text-decoration: underline")
    assert cell("0.60 \u00b1 0.10") not in styled
    write_tables(summarize(per_seed), tmp_path / "again", per_seed_df=per_seed)
    assert (tmp_path / "again" / "toy_faces_T5.html").read_bytes() == page.encode()  # no random ids

    wide = pd.read_csv(written[0])
    assert list(wide.columns) == ["method", "N_train", "N_train_std", "A_mmd", "A_mmd_std", "A_clip", "A_clip_std",
                                  "n_seeds", "source"]
    assert set(wide.n_seeds) == {3}
    assert wide.loc[wide.method == "full_ft", "A_mmd_std"].item() == pytest.approx(math.sqrt(13.0))


def test_tables_without_per_seed_have_no_underline(tmp_path):
    written = write_tables(summarize(long_frame()), tmp_path)
    tex = written[1].read_text()
    assert r"\underline" not in tex and "Welch" not in tex


def test_latex_escape():
    assert latex_escape("a_b&c%d$e#f{g}") == r"a\_b\&c\%d\$e\#f\{g\}"


def test_forgetting_curves_png(tmp_path):
    rows = []
    for method in ["lora_sequential", "full_ft"]:
        for seed in range(2):
            for t in range(1, 4):
                for c in range(1, t + 1):
                    rows.append(dict(benchmark="toy_faces", n_tasks=3, method=method, seed=seed,
                                     after_task=t, concept_index=c, metric="A_oracle",
                                     value=1.0 - 0.2 * (t - c) + 0.01 * seed))
    written = forgetting_curves(pd.DataFrame(rows), tmp_path / "curves.png", "A_oracle")
    assert [p.suffix for p in written] == [".png", ".pdf"]
    assert all(p.stat().st_size > 0 for p in written)
    assert written[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(UserError, match="A_clip"):
        forgetting_curves(pd.DataFrame(rows), tmp_path / "none.png", "A_clip")


def test_sample_grid_png(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 3, 8, 8, 3), dtype=np.uint8)
    present = np.tril(np.ones((3, 3), bool)).T  # concept c appears from task c on
    written = sample_grid(images, ["c1", "c2", "c3"], ["T1", "T2", "T3"], tmp_path / "grid.png",
                          "lora_sequential", present=present)
    assert written[0].name == "grid.png" and written[0].stat().st_size > 0
    assert written[0].read_bytes()[:4] == b"\x89PNG"


def test_duplicate_run_raises_user_error(tmp_path):
    paths = write_run_files(tmp_path)
    with pytest.raises(UserError, match="duplicate metric row") as err:
        load_metrics([paths[0], paths[0]])
    assert str(paths[0]) in str(err.value)


def test_cls_track_order_and_unknown_metric(tmp_path):
    rows = [dict(track="cls", benchmark="toy_cls", n_tasks=2, method=m, seed=s, metric=k, value=v)
            for m, base in [("a", 0.5), ("b", 0.7)] for s in range(2)
            for k, v in [("zeta", 1.0 + s), ("F_N", base / 2 + s / 10), ("A_N", base + s / 10)]]
    written = write_tables(summarize(pd.DataFrame(rows)), tmp_path)
    assert list(pd.read_csv(written[0]).columns) == ["method", "A_N", "A_N_std", "F_N", "F_N_std", "zeta", "zeta_std",
                                                     "n_seeds", "source"]
    tex = written[1].read_text()
    assert r"Method & A\_N $\uparrow$ & F\_N $\downarrow$ & zeta \\" in tex


def _cls_frame() -> pd.DataFrame:
    rows = []
    for n in (5, 10):
        for method, base in (("ft", 10.0), ("coda_p", 70.0)):
            for seed in range(3):
                rows.append(dict(track="cls", benchmark="toy_imagenet_r", n_tasks=n, method=method, seed=seed,
                                 metric="A_N", value=base - n + seed))
                rows.append(dict(track="cls", benchmark="toy_imagenet_r", n_tasks=n, method=method, seed=seed,
                                 metric="F_N", value=80.0 - base + seed))
    return pd.DataFrame(rows)


def _reference(tmp_path) -> pd.DataFrame:
    from continual_bench.reporting.reference import load_reference

    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "x.csv").write_text("track,benchmark,n_tasks,method,metric,mean,std,source\n"
                               "cls,toy_imagenet_r,5,coda_p,A_N,76.51,0.38,Paper A\n"
                               "cls,toy_imagenet_r,10,coda_p,A_N,75.45,0.56,Paper A\n"
                               "cls,other,5,coda_p,A_N,1.0,0.1,Paper B\n")
    return load_reference(ref)


def test_combined_cls_table_with_reported_block(tmp_path):
    per_seed = _cls_frame()
    written = write_tables(summarize(per_seed), tmp_path / "tables", per_seed_df=per_seed,
                           reference_df=_reference(tmp_path))
    names = [p.name for p in written]
    assert "toy_imagenet_r_combined.tex" in names and "toy_imagenet_r_T10.tex" in names
    tex = (tmp_path / "tables" / "toy_imagenet_r_combined.tex").read_text()
    assert r"\multicolumn{2}{c}{5 tasks} & \multicolumn{2}{c}{10 tasks}" in tex
    assert r"Method & A\_N $\uparrow$ & F\_N $\downarrow$ & A\_N $\uparrow$ & F\_N $\downarrow$ \\" in tex
    # coda_p is best on every column; its reported row sits below a second rule and is never bold
    lines = tex.splitlines()
    own = next(i for i, ln in enumerate(lines) if ln.startswith(r"coda\_p &"))
    rep = next(i for i, ln in enumerate(lines) if ln.startswith(r"coda\_p (reported)"))
    assert rep > own and lines[rep - 1] == r"\midrule" and r"\textbf" not in lines[rep]
    assert r"\textbf{61.00 $\pm$ 1.00}" in lines[own]  # 5 tasks: 70 - 5 + mean(0, 1, 2)
    assert "76.51 $\\pm$ 0.38 & -- & 75.45 $\\pm$ 0.56 & --" in lines[rep]
    assert "Paper A" in tex and "Paper B" not in tex and "1.00 $\\pm$ 0.10" not in tex
    combined = pd.read_csv(tmp_path / "tables" / "toy_imagenet_r_combined.csv")
    assert list(combined.source) == ["continual-bench", "continual-bench", "reported: Paper A (toy_imagenet_r)"]
    assert combined.loc[0, "A_N_T10"] == pytest.approx(1.0)


def test_reference_rows_need_a_source(tmp_path):
    from continual_bench.reporting.reference import load_reference

    (tmp_path / "bad.csv").write_text("track,benchmark,n_tasks,method,metric,mean,std,source\ncls,b,5,m,A_N,1,0,\n")
    with pytest.raises(UserError, match="bad.csv.*source"):
        load_reference(tmp_path)


def _r_long(metric="oracle", T=3) -> pd.DataFrame:
    rows = []
    for seed in range(2):
        for t in range(1, T + 1):
            for k in range(1, t + 1):
                rows.append(dict(track="t2i", benchmark="toy_faces", n_tasks=T, method="lora_sequential", seed=seed,
                                 after_task=t, concept_index=k, metric=metric, value=1.0 - 0.2 * (t - k) + 0.01 * seed))
    return pd.DataFrame(rows)


def test_heatmap_and_accuracy_curves(tmp_path):
    from continual_bench.reporting.figures import accuracy_curves, r_matrix_heatmap

    paths = r_matrix_heatmap(_r_long(), tmp_path / "h.png", "oracle")
    assert [p.suffix for p in paths] == [".png", ".pdf"] and paths[0].stat().st_size > 2000
    first = paths[1].read_bytes()
    r_matrix_heatmap(_r_long(), tmp_path / "h.png", "oracle")
    assert paths[1].read_bytes() == first  # regenerated figures are byte-identical (no PDF creation date)
    acc = pd.concat([_r_long("acc", 3).assign(track="cls"), _r_long("acc", 4).assign(track="cls")])
    assert accuracy_curves(acc, tmp_path / "a.png")[0].stat().st_size > 2000
    with pytest.raises(UserError, match="clip"):
        r_matrix_heatmap(_r_long(), tmp_path / "x.png", "clip")


def test_sample_grid_from_npz_has_base_column_and_generic_row(tmp_path):
    from continual_bench.reporting import grids

    img = np.zeros((4, 8, 8, 3), np.uint8)
    keys = ["after1_concept1", "after2_concept2", "after2_concept1", "after0_generic", "after2_generic"]
    np.savez(tmp_path / "s.npz", **{k: img + i for i, k in enumerate(keys)})
    seen = {}

    def fake_grid(grid, rows, cols, out, title, present):
        seen.update(rows=rows, cols=cols, present=present)
        return [out]

    info = {"sequence": ["concept_03", "concept_01"], "tokens": ["<v1>", "<v2>"], "class_word": "person"}
    orig = grids.sample_grid
    grids.sample_grid = fake_grid
    try:
        grids.sample_grid_from_npz(tmp_path / "s.npz", info, tmp_path / "g.png", "t")
    finally:
        grids.sample_grid = orig
    assert seen["rows"] == ["<v1> (concept_03)", "<v2> (concept_01)", '"a photo of a person"']
    assert seen["cols"] == ["base model", "after task 1", "after task 2"]
    assert seen["present"].tolist() == [[False, True, True], [False, False, True], [True, False, True]]


def _png_size(path):
    import struct

    data = path.read_bytes()
    return struct.unpack(">II", data[16:24])  # width, height from the IHDR chunk


def test_many_methods_are_laid_out_in_a_grid(tmp_path):
    """16 methods: 4 columns x 4 rows, not a 16-panel strip (the earlier layout was ~5,900 px wide for 12)."""
    from continual_bench.reporting.figures import MAX_COLS, r_matrix_heatmap

    df = pd.concat([_r_long().assign(method=f"m{i:02d}") for i in range(16)])
    w, h = _png_size(forgetting_curves(df, tmp_path / "c.png", "oracle", pdf=False)[0])
    assert MAX_COLS == 4 and w <= 2200 and h > w / 2  # rows, not a strip
    w, h = _png_size(r_matrix_heatmap(df, tmp_path / "h.png", "oracle", pdf=False)[0])
    assert w <= 2200 and h > w / 2


def test_tradeoff_plot_points_floor_and_references(tmp_path):
    from continual_bench.reporting.figures import tradeoff_plot

    rows = [dict(benchmark="toy_faces", n_tasks=10, method=m, seed=s, metric=f"{a}_oracle", value=v + 0.01 * s)
            for m, (p, f) in {"lora_sequential": (0.8, 0.7), "c_lora": (0.75, 0.3), "joint": (0.7, -0.1)}.items()
            for s in range(3) for a, v in (("P", p), ("F", f))]
    df = pd.DataFrame(rows)
    paths = tradeoff_plot(df, tmp_path / "t.png", "oracle", floor=0.08, references=("joint",))
    assert [p.suffix for p in paths] == [".png", ".pdf"] and paths[0].stat().st_size > 5000
    first = paths[1].read_bytes()
    tradeoff_plot(df, tmp_path / "t.png", "oracle", floor=0.08, references=("joint",))
    assert paths[1].read_bytes() == first
    with pytest.raises(UserError, match="P_clip"):
        tradeoff_plot(df, tmp_path / "x.png", "clip")


def _t2i_lengths_frame() -> pd.DataFrame:
    """Two methods at 5 and 10 tasks, 3 seeds: c_lora forgets less, and both forget more on the longer sequence."""
    rows = []
    for n in (5, 10):
        for m, (p, a, f, fm) in {"lora_sequential": (0.9, 0.3, 0.6, 3000.0), "c_lora": (0.8, 0.6, 0.2, 500.0)}.items():
            for s in range(3):
                grow = 1.0 if n == 5 else 1.5
                for metric, v in (("P_oracle", p), ("A_oracle", a / grow), ("F_oracle", f * grow), ("F_mmd", fm * grow)):
                    rows.append(dict(track="t2i", benchmark="toy_faces", n_tasks=n, method=m, seed=s, metric=metric,
                                     value=v + 0.01 * s))
    return pd.DataFrame(rows)


def test_combined_t2i_table_only_with_several_lengths(tmp_path):
    per_seed = _t2i_lengths_frame()
    written = [p.name for p in write_tables(summarize(per_seed), tmp_path / "t", per_seed_df=per_seed)]
    assert "toy_faces_combined.tex" in written and "toy_faces_T10.csv" in written
    tex = (tmp_path / "t" / "toy_faces_combined.tex").read_text()
    assert r"\multicolumn{4}{c}{5 tasks} & \multicolumn{4}{c}{10 tasks}" in tex
    combined = pd.read_csv(tmp_path / "t" / "toy_faces_combined.csv").set_index("method")
    assert combined.loc["c_lora", "F_oracle_T10"] == pytest.approx(0.2 * 1.5 + 0.01)  # + mean(0, .01, .02)
    assert combined.loc["lora_sequential", "F_mmd_T5"] == pytest.approx(3000.01)
    # one length: no combined text-to-image table (the committed single-length results keep their files)
    one = per_seed[per_seed.n_tasks == 5]
    assert not any("combined" in p.name for p in write_tables(summarize(one), tmp_path / "one", per_seed_df=one))


def test_lengths_plot_one_panel_per_metric_and_floor(tmp_path):
    from continual_bench.reporting.figures import lengths_plot

    df = _t2i_lengths_frame()
    asked = []
    paths = lengths_plot(df, tmp_path / "l.png", ("P_oracle", "A_oracle", "F_oracle"),
                         floors=lambda m, n: asked.append((m, n)) or 0.05)
    assert [p.suffix for p in paths] == [".png", ".pdf"] and paths[0].stat().st_size > 5000
    assert ("F_oracle", 5) in asked and ("F_oracle", 10) in asked  # the floor of each length's F column
    with pytest.raises(UserError, match="P_clip"):
        lengths_plot(df, tmp_path / "x.png", ("P_clip", "F_clip"))


def test_lengths_plot_puts_one_papers_readings_in_a_row_of_their_own(tmp_path, monkeypatch):
    """Many methods: the readings of one paper (>= 3, by the registry's paper) get their own row of panels, every
    column shares its y axis so the rows compare, and each method is drawn exactly once."""
    import matplotlib.figure

    from continual_bench.reporting.figures import lengths_plot
    from continual_bench.reporting.report import paper_rows

    base = _t2i_lengths_frame()
    lfs = ["lfs_diffusion", "lfs_diffusion_no_icgen", "lfs_diffusion_kd_previous"]
    df = pd.concat([base] + [base[base.method == "c_lora"].assign(method=m) for m in [*lfs, "textual_inversion"]])
    methods = list(pd.unique(df.method))
    rows = paper_rows("t2i", methods)
    assert rows == [("Song et al. (LFS-Diffusion)", lfs)]  # C-LoRA's paper has two methods here (with lora_sequential): no row
    drawn = []
    real_subplots = matplotlib.figure.Figure.subplots

    def spy(fig, *a, **kw):
        grid = real_subplots(fig, *a, **kw)
        drawn.append(grid)
        return grid

    monkeypatch.setattr(matplotlib.figure.Figure, "subplots", spy)
    lengths_plot(df, tmp_path / "l.png", ("P_oracle", "A_oracle", "F_oracle"), rows=rows, pdf=False)
    (grid,) = drawn
    assert grid.shape == (2, 3)
    labels = [[t.get_text() for t in ax.get_legend().get_texts()] if ax.get_legend() else []
              for ax in grid[:, -1]]
    assert labels == [["lora_sequential", "c_lora", "textual_inversion"], lfs]
    assert grid[0, 2].get_ylim() == grid[1, 2].get_ylim()  # shared per column
    assert grid[1, 0].get_title().endswith(": Song et al. (LFS-Diffusion)")


def test_report_draws_the_lengths_figure_for_several_lengths(tmp_path):
    from continual_bench.reporting.report import build_report

    header = "track,benchmark,n_tasks,method,seed,metric,value,config_hash,git_commit,packages,continual_bench,python\n"
    paths = []
    for (n, method, seed), g in _t2i_lengths_frame().groupby(["n_tasks", "method", "seed"]):
        p = tmp_path / "runs" / "toy_faces" / f"T{n}" / method / f"seed{seed}" / "metrics.csv"
        p.parent.mkdir(parents=True)
        p.write_text(header + "".join(f"t2i,toy_faces,{n},{method},{seed},{r.metric},{r.value}{EXTRA}\n"
                                      for r in g.itertuples()))
        paths.append(p)
    written = {p.name for p in build_report(tmp_path, metric_paths=paths, noise_floor_paths=[])}
    assert {"lengths_toy_faces_oracle.png", "lengths_toy_faces_mmd.png", "toy_faces_combined.tex"} <= written
    assert "lengths_toy_faces_clip.png" not in written  # no CLIP metric in these runs
