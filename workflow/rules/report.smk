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
