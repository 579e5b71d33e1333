# Merge every combo's metrics.json into the tables (CSV, tidy CSV, Markdown, LaTeX) and draw one
# comparison plot per dataset; `snakemake --report report.html` shows them with the captions in
# workflow/report/.


rule summary:
    input:
        eval_metrics(),
    output:
        csv=report(
            "results/tables/summary.csv",
            caption="../report/summary.rst",
            category="Tables",
        ),
        md="results/tables/summary.md",
        long="results/tables/summary_long.csv",
        tex=report(
            "results/tables/summary.tex",
            caption="../report/latex.rst",
            category="Tables",
        ),
    params:
        method_order=METHODS,
        model_order=list(MODELS),
        dataset_order=list(DATASETS),
    log:
        "logs/summary.log",
    benchmark:
        "results/benchmarks/summary.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        ENV
    script:
        "../../scripts/summary.py"


rule plot:
    input:
        "results/tables/summary.csv",
    output:
        report(
            "results/plots/{dataset}.png",
            caption="../report/plot.rst",
            category="Plots",
            subcategory="{dataset}",
        ),
    params:
        model_order=list(MODELS),
    log:
        "logs/plot/{dataset}.log",
    benchmark:
        "results/benchmarks/plot/{dataset}.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        ENV
    script:
        "../../scripts/plot.py"


# The sequential schedule's own tables and plots (config `evaluation.sequential`).
use rule summary as summary_sequential with:
    input:
        sequential_metrics(),
    output:
        csv=report(
            f"{SEQUENTIAL_DIR}/tables/summary.csv",
            caption="../report/summary_sequential.rst",
            category="Tables (sequential)",
        ),
        md=f"{SEQUENTIAL_DIR}/tables/summary.md",
        long=f"{SEQUENTIAL_DIR}/tables/summary_long.csv",
        tex=f"{SEQUENTIAL_DIR}/tables/summary.tex",
    log:
        "logs/summary_sequential.log",
    benchmark:
        "results/benchmarks/summary_sequential.tsv"


use rule plot as plot_sequential with:
    input:
        f"{SEQUENTIAL_DIR}/tables/summary.csv",
    output:
        report(
            f"{SEQUENTIAL_DIR}/plots/{{dataset}}.png",
            caption="../report/plot.rst",
            category="Plots (sequential)",
            subcategory="{dataset}",
        ),
    log:
        "logs/plot_sequential/{dataset}.log",
    benchmark:
        "results/benchmarks/plot_sequential/{dataset}.tsv"
