NAME = "helper-module"
