from dllmctl.cli import main

main()
