"""Built-in curriculum stages (the paper's recipe) arrive with the training-at-scale issue."""
