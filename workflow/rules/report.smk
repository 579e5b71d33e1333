# Merge every combo's metrics.json into the summary tables.


rule summary:
    input:
        eval_metrics(),
    output:
        csv=report(
            "results/tables/summary.csv",
            caption="../report/summary.rst",
            category="Summary",
        ),
        md="results/tables/summary.md",
    params:
        method_order=METHODS,
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
