"""What several experiments share: result records, step timing, the checkout."""
