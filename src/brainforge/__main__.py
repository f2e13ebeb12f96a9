from brainforge.cli import main

main()
