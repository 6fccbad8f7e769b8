"""`hp-pipe bench …`: the benchmarks, side by side in one run (features, train, hcl, order, planted).

Library code: a bench runs stages through `pipeline.graph.build`, never by importing `stages`."""
