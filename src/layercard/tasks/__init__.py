"""Tasks: data sources, prompt formats, token encoding and metrics.

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
    turn_end_token,
    turn_end_token_id,
)
from layercard.tasks.example import Example
from layercard.tasks.loss import IGNORE_INDEX, loss_sum, target_count, target_mask
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
from layercard.tasks.synthetic import make_facts, make_format, make_synthetic

__all__ = [
    "DATASET_PRESETS",
    "IGNORE_INDEX",
    "LOSS",
    "METRICS",
    "PRESETS",
    "Encoded",
    "Example",
    "Metric",
    "Task",
    "TaskFormat",
    "batches",
    "bleu",
    "build_prompt",
    "collate",
    "compute_metrics",
    "count_target_tokens",
    "data_roots",
    "detect_preset",
    "encode_example",
    "encode_prompt",
    "encode_task",
    "exact_match",
    "examples_from_records",
    "expand_references",
    "extract_final_number",
    "get_preset",
    "held_out",
    "higher_is_better",
    "is_file_spec",
    "gsm8k_accuracy",
    "label_accuracy",
    "load_task",
    "loss_sum",
    "make_facts",
    "make_format",
    "make_synthetic",
    "metric_scale",
    "names_split",
    "normalize_text",
    "read_jsonl",
    "rouge_l",
    "strict_match",
    "target_count",
    "target_mask",
    "token_f1",
    "turn_end_token",
    "turn_end_token_id",
]
