from lab.train.cli import main

main()
