"""Guest VMs through libvirt. The only package that imports libvirt.

Public surface: `Hypervisor` (host.py), `HypervisorError` (errors.py), `ImageCache`
(images.py), `build_domain_xml` (xml.py), `choose_virt_type` (probe.py).
"""
