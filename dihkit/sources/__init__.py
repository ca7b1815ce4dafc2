"""The datasets: their kinds, where their files come from, the decode cache, generated data, batches."""
