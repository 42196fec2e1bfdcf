"""`python -m nimbus.workers`: the workers (see `nimbus.workers.run`)."""

from nimbus.workers.run import main

main()
