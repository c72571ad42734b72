"""The network-slimming lab (LAB.md): its plug-in is labs.slimming.lab.LAB."""
