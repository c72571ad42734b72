"""Answer key of the student template: one entry per marked region of the notebooks.

Keep this file out of the copy handed to students.

A region in a notebook code cell looks like::

    # >>> BLANK <id>: <one-line instruction>
    <placeholder body>
    # <<< BLANK <id>

(``TODO`` instead of ``BLANK`` for the ungraded ``min-channels`` rule). The code
below is written at column 0; fixtures/make_fixtures.py indents it to the
region's indentation and puts it in place of the placeholder body, keeping the
two marker lines, which gives the full solution.
"""

ANSWERS = {
    # sparsity_train.ipynb, parameters cell
    'lambda': "LAMBDA = 1e-4\n",

    # sparsity_train.ipynb, body of updateBN()
    'updateBN': (
        "for m in model.modules():\n"
        "    if isinstance(m, nn.BatchNorm2d):\n"
        "        m.weight.grad.data.add_(LAMBDA * torch.sign(m.weight.data))\n"
    ),

    # vggprune.ipynb, ungraded: never leave a layer (almost) empty
    'min-channels': (
        "if mask.sum() < MIN_CHANNELS:\n"
        "    top = torch.topk(weight_copy, min(MIN_CHANNELS, weight_copy.numel())).indices\n"
        "    mask[top] = 1.0\n"
    ),

    # vggprune.ipynb, body of kept_indices(mask)
    'kept-indices': (
        "idx = np.squeeze(np.argwhere(np.asarray(mask.cpu().numpy())))\n"
        "if idx.size == 1:\n"
        "    idx = np.resize(idx, (1,))\n"
        "return idx\n"
    ),

    # vggprune.ipynb, copy loop, BatchNorm2d branch
    'copy-bn-affine': (
        "m1.weight.data = m0.weight.data[idx1].clone()\n"
        "m1.bias.data = m0.bias.data[idx1].clone()\n"
    ),
    'copy-bn-stats': (
        "m1.running_mean = m0.running_mean[idx1].clone()\n"
        "m1.running_var = m0.running_var[idx1].clone()\n"
    ),

    # vggprune.ipynb, copy loop, Linear branch
    'copy-linear-weight': "m1.weight.data = m0.weight.data[:, idx0].clone()\n",
    'copy-linear-bias': "m1.bias.data = m0.bias.data.clone()\n",
}
