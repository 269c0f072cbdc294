"""Select: clustering, similarity kernels, SemDeDup, budgets, CLIPCov, recipes, subset export."""
