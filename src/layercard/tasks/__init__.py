"""Tasks: data sources and schemas, prompt formats and settings, token encoding and metrics.

>>> task = load_task("synthetic:facts", split="train", seed=0)
>>> task.format.metrics[0]
'exact_match'
"""

from layercard.tasks.data import (
    Task,
    data_roots,
    examples_from_records,
    expand_references,
    held_out,
    is_file_spec,
    load_task,
    names_split,
    read_jsonl,
)
from layercard.tasks.encode import (
    Encoded,
    batches,
    build_prompt,
    collate,
    count_target_tokens,
    encode_example,
    encode_prompt,
    encode_task,
    end_token_id,
    turn_end_token,
    turn_end_token_id,
)
from layercard.tasks.example import ROLES, Example
from layercard.tasks.formats import DATA_SUFFIXES, dataset_splits, is_saved_dataset, read_records
from layercard.tasks.loss import (
    IGNORE_INDEX,
    forward_loss,
    forward_row_losses,
    loss_sum,
    target_count,
    target_mask,
)
from layercard.tasks.metrics import (
    LOSS,
    METRICS,
    Metric,
    bleu,
    compute_metrics,
    exact_match,
    extract_final_number,
    gsm8k_accuracy,
    higher_is_better,
    label_accuracy,
    metric_scale,
    normalize_text,
    rouge_l,
    strict_match,
    token_f1,
)
from layercard.tasks.presets import DATASET_PRESETS, PRESETS, TaskFormat, detect_preset, get_preset
from layercard.tasks.prompt import apply_prompt, read_setting
from layercard.tasks.schemas import FIELDS, SCHEMAS
from layercard.tasks.synthetic import make_facts, make_format, make_synthetic

__all__ = [
    "DATASET_PRESETS",
    "DATA_SUFFIXES",
    "FIELDS",
    "IGNORE_INDEX",
    "LOSS",
    "METRICS",
    "PRESETS",
    "ROLES",
    "SCHEMAS",
    "Encoded",
    "Example",
    "Metric",
    "Task",
    "TaskFormat",
    "apply_prompt",
    "batches",
    "bleu",
    "build_prompt",
    "collate",
    "compute_metrics",
    "count_target_tokens",
    "data_roots",
    "dataset_splits",
    "detect_preset",
    "encode_example",
    "encode_prompt",
    "encode_task",
    "end_token_id",
    "exact_match",
    "examples_from_records",
    "expand_references",
    "extract_final_number",
    "get_preset",
    "held_out",
    "higher_is_better",
    "is_file_spec",
    "is_saved_dataset",
    "gsm8k_accuracy",
    "label_accuracy",
    "load_task",
    "forward_loss",
    "forward_row_losses",
    "loss_sum",
    "make_facts",
    "make_format",
    "make_synthetic",
    "metric_scale",
    "names_split",
    "normalize_text",
    "read_jsonl",
    "read_records",
    "read_setting",
    "rouge_l",
    "strict_match",
    "target_count",
    "target_mask",
    "token_f1",
    "turn_end_token",
    "turn_end_token_id",
]
