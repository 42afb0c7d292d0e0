"""Post-training data: preference pairs from sampled answers (`pairs`) and the execution sandbox (`sandbox`)."""
