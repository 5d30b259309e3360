"""The library halves of the CLI commands (audit, finetune, explain): the CLI parses arguments
into these calls; benchmarks and scripts call them directly."""
