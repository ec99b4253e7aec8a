"""``python -m studio.kernel -f CONNECTION_FILE``: what the "PySpark" kernelspec runs."""

from ipykernel.kernelapp import IPKernelApp

from studio.kernel.kernel import PySparkKernel

IPKernelApp.launch_instance(kernel_class=PySparkKernel)
