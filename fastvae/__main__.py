from fastvae.cli import run

run()
