"""`gkv_jax.evaluate`: accuracy of eviction policies and budgets on a dataset, resumable.

    report = gkv_jax.evaluate(model, tokenizer, "aime24", policies=("full", "gkv"),
                              budgets=(512, 1024), samples=8, pass_k=(1, 8),
                              temperature=0.6, top_p=0.95, max_new_tokens=16384)
    print(report.table())

Every (policy, budget) is one `EvictionConfig`; every (config, problem, sample) one row of
`output_dir/results.jsonl`, appended and flushed as rows finish, so an interrupted run
started again with the same arguments skips the rows already there and reproduces the rows
an uninterrupted run would have written. Each config's rows run through one slot engine
(`gkv_jax.Engine`: continuous batching, the samples of a problem sharing one prefill), which
compiles one prefill per prompt bucket, one insert and one cycle.

Modules (run imports the others; prompts, rows and summary import only configs, store none):
  configs  the eviction configs of a sweep and their short names
  prompts  the problems and their prompt token ids, the generation length
  rows     graded rows, generated through the slot engine
  run      `evaluate`; the static batch planner it replaced; the report
  store    results.jsonl and settings.json (fingerprints a resumed run must match)
  summary  pass@k, summary.csv, the text table and the accuracy plot
Every public name is re-exported here, so `from gkv_jax.evaluation import ...` keeps working.
"""

from gkv_jax.evaluation.configs import config_name, eviction_configs
from gkv_jax.evaluation.prompts import (
    DEFAULT_MAX_NEW_TOKENS,
    R1_SYSTEM_PROMPT,
    UNKNOWN_SHARE_LIMIT,
    check_encodable,
    format_prompt,
    format_prompts,
    resolve_max_new_tokens,
)
from gkv_jax.evaluation.rows import make_row
from gkv_jax.evaluation.run import (
    Batch,
    EvalReport,
    batch_prompts,
    batch_rows,
    evaluate,
    plan_batches,
    report_keys,
)
from gkv_jax.evaluation.store import (
    EVAL_MARKER,
    RESULTS_FILE,
    SETTINGS_FILE,
    append_results,
    check_settings,
    claim_output_dir,
    mark_evaluation_dir,
    output_dir_problem,
    problem_fingerprints,
    read_results,
    row_key,
    weights_fingerprint,
)
from gkv_jax.evaluation.summary import (
    PLOT_FILE,
    SUMMARY_FILE,
    accuracy_figure,
    format_table,
    pass_at_k,
    plot_accuracy,
    plot_title,
    summarize,
    write_summary_csv,
)

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS", "EVAL_MARKER", "PLOT_FILE", "R1_SYSTEM_PROMPT", "RESULTS_FILE",
    "SETTINGS_FILE", "SUMMARY_FILE", "UNKNOWN_SHARE_LIMIT", "Batch", "EvalReport",
    "accuracy_figure", "append_results", "batch_prompts", "batch_rows", "check_encodable",
    "check_settings", "claim_output_dir", "config_name", "evaluate",
    "eviction_configs", "format_prompt", "format_prompts", "format_table", "make_row",
    "mark_evaluation_dir", "output_dir_problem", "pass_at_k", "plan_batches", "plot_accuracy",
    "plot_title", "problem_fingerprints", "read_results", "report_keys", "resolve_max_new_tokens",
    "row_key", "summarize", "weights_fingerprint", "write_summary_csv",
]
