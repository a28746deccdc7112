"""`ballad-pipe report`: print the zero-shot / Phase A / BALLAD table from the reports folder."""
import click


@click.command()
@click.option("--reports", default="reports", show_default=True, type=click.Path(), help="Folder of evaluate outputs.")
@click.option("--out", type=click.Path(dir_okay=False), help="Also write the table to this Markdown file.")
def report(reports, out):
    """Top-1 accuracy (%) by shot group for each evaluated model."""
    from pipeline.runtime import atomic_path
    from stages.report import load_rows, render_table

    table = render_table(load_rows(reports))
    click.echo(table)
    if out:
        with atomic_path(out) as tmp:
            tmp.write_text(table + "\n")
