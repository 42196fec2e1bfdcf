"""`python -m nimbus.server`: the doorman (gRPC server). The code is in `nimbus.doorman`."""

from nimbus.doorman.server import main

if __name__ == "__main__":
    main()
