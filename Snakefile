# mmke: the MMEdit benchmark as a DAG of cached stages. Default config = the embedded demo.
from snakemake.utils import min_version, validate

min_version("9.0")


# The demo is the default; `--configfile config/mmedit.yaml` *replaces* it (Snakemake would
# otherwise deep-merge both, adding the demo's tiny models and datasets to the paper grid).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/base_model.smk"
include: "workflow/rules/embed.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/baseline.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        eval_metrics(),
        summary_tables(),
        plots(),
        sequential_outputs(),
