"""Studies made of several runs: parameter sweeps and the paper's reproduction."""
