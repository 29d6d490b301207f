"""How does everything interact? (a grid nobody can run)"""
from ray import tune
from sweeper.spaces import Sweep

sweep = Sweep(name="huge_grid", space={
    "optim.lr": tune.grid_search([0.001 * i for i in range(1, 101)]),
    "optim.momentum": tune.grid_search([i / 101 for i in range(100)]),
    "model.width": tune.grid_search([0.125 * i for i in range(1, 101)]),
    "optim.weight_decay": tune.grid_search([1e-5 * i for i in range(100)]),
})
