from dllmd.cli import main

main()
