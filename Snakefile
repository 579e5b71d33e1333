# mmke: the MMEdit benchmark as a DAG of cached stages. Default config = the embedded demo.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/base_model.smk"
include: "workflow/rules/baseline.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        eval_metrics(),
        summary_tables(),
