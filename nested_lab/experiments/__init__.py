"""What each chapter runs, tabulates and benchmarks, one module per chapter (named after its
notebook); everything reusable lives in the mechanism layers below."""
