from vcompress.cli import main

main()
