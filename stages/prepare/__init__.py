"""Stage `prepare`: long-tailed datasets → webdataset shards (see store/shards.py for the format).

One module per data source, each registering its config and its function (registry.py): the
generated shapes demo (synthetic.py), ImageNet-LT / Places-LT / iNaturalist style split lists
(`relative/path.jpg <label>` per line, lists.py), image folders in torchvision's ImageFolder layout
(turned into the same (path, label) lists, folder.py; what the two share: files.py) and CIFAR-100-LT
cut from the official python archive (cifar.py). All four write through one writer (writer.py), which
resumes an interrupted run. Every option is checked before anything is read or written
(common.py: the options the sources share, their checks, the rebuild command dataset.json records);
class names files: classes.py.

A fifth source writes no shards: `index` (index.py) describes webdataset shards that exist already
(local, http(s), pipe:, …) in a dataset.json that lists their URLs, after one scan for labels and
counts. Data sources, dataset.json's fields and what is checked when: docs/data.md.
"""
