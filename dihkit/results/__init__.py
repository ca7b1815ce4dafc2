"""The results layer: the pipeline, the report's model of result files, comparisons and plots."""
