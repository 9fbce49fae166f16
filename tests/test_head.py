import torch

from scp_dist.models.head import SCPHead


def test_paper_shape_and_layers():
    head = SCPHead(512, [1024, 786, 512, 1024], 10)
    assert head.dims == [512, 1024, 786, 512, 1024, 10]
    assert len(head.weights) == 5  # five linear layers
    out = head(torch.randn(3, 512))
    assert out.shape == (1, 3, 10)


def test_single_head_equals_plain_mlp():
    head = SCPHead(6, [8, 5], 3, seed=3)
    layers = []
    for i, (w, b) in enumerate(zip(head.weights, head.biases, strict=True)):
        lin = torch.nn.Linear(w.shape[1], w.shape[2])
        lin.weight.data.copy_(w[0].T)
        lin.bias.data.copy_(b[0, 0])
        layers.append(lin)
        if i < 2:
            layers.append(torch.nn.ReLU())
    mlp = torch.nn.Sequential(*layers)
    x = torch.randn(4, 6)
    torch.testing.assert_close(head(x)[0], mlp(x))


def test_heads_are_independent_and_seeded():
    multi = SCPHead(6, [8], 4, num_heads=3, seed=10)
    x = torch.randn(5, 6)
    out = multi(x)
    for h in range(3):
        single = SCPHead(6, [8], 4, num_heads=1, seed=10 + h)
        torch.testing.assert_close(out[h], single(x)[0])
    assert not torch.allclose(out[0], out[1])
    # Gradient of head 0's output touches only head 0's slice.
    out[0].sum().backward()
    assert multi.weights[0].grad[1:].abs().sum() == 0
    assert multi.weights[0].grad[0].abs().sum() > 0
