"""AnnData -> checked minibatches (private)."""
