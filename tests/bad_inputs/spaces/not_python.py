Search space: VGG depth study. Vary depth 11 to 19, init normal/xavier/he, with and without BN.
Learning rate log-uniform from 1e-3 to 1e-1.
