"""transferkit: reproducible transfer learning on CIFAR."""
