"""SemanticKITTI: the teacher, baseline and distillation stages, validation mIoU, the Table 6 grid and prediction files."""
