"""Lab 5: a low-complexity CIFAR-100 model, judged by FLOPs, parameter size and accuracy.

The trusted core lives in flat modules: ``data`` (CIFAR-100 reader, writer, stand-in),
``reference_model`` (the small reference CNN), ``export`` (runs inside the student's
kernel and writes the model as JSON graph + tensors), ``measure`` (reads those files
outside the sandbox, re-counts and re-tests, and checks the notebook's printed claims).
Nothing heavy is imported here, so loading the package costs nothing.
"""
